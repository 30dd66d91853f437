"""Run one cell in a benchmark's kernel: its result as text, or its error raised here; and the
alternating rounds every kernel benchmark times its contenders in."""

from __future__ import annotations

import textwrap
from typing import Callable, Iterable


def run(client, code: str, timeout: float = 600) -> str:
    result = {}

    def keep(message):
        if message["msg_type"] == "execute_result":
            result["value"] = message["content"]["data"]["text/plain"]
        elif message["msg_type"] == "error":
            raise RuntimeError("\n".join(message["content"]["traceback"]))

    client.execute_interactive(textwrap.dedent(code), output_hook=keep, timeout=timeout)
    return result.get("value", "")


def alternating(names: Iterable[str], runs: int, measure: Callable[[str], float]) -> dict[str, list[float]]:
    """`measure(name)` for every name, `runs` rounds, the order reversed every other round."""
    names = list(names)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(runs):
        for name in names if round_index % 2 == 0 else reversed(names):
            times[name].append(measure(name))
    return times
