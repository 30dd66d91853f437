"""A benchmark's kernel, and one cell run in it: its result as text, or its error raised here; and the
alternating rounds every kernel benchmark times its contenders in."""

from __future__ import annotations

import textwrap
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from jupyter_client.manager import start_new_kernel


@contextmanager
def kernel(*arguments: str) -> Iterator[tuple[Any, Any]]:
    """A fresh Python kernel (its manager and client), shut down when the block ends."""
    manager, client = start_new_kernel(kernel_name="python3", extra_arguments=list(arguments))
    try:
        yield manager, client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


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
