"""Run one cell in a benchmark's kernel: its result as text, or its error raised here."""

from __future__ import annotations

import textwrap


def run(client, code: str, timeout: float = 600) -> str:
    result = {}

    def keep(message):
        if message["msg_type"] == "execute_result":
            result["value"] = message["content"]["data"]["text/plain"]
        elif message["msg_type"] == "error":
            raise RuntimeError("\n".join(message["content"]["traceback"]))

    client.execute_interactive(textwrap.dedent(code), output_hook=keep, timeout=timeout)
    return result.get("value", "")
