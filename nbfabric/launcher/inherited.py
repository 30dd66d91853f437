"""What a forked rank takes over from the process that forked it: the logging handlers of its
console and, in a Jupyter kernel, a display publisher that sends rich output to the launching
process instead of using the kernel's sockets, and tqdm's notebook bars turned into text bars.
Found before forking; applied in the rank."""

from __future__ import annotations

import builtins
import functools
import getpass
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from nbfabric.channel import Display
from nbfabric.launcher.rank_links import rank_links


@dataclass(frozen=True)
class Inherited:
    """What a forked rank takes over from the launching process. Forking launches find it before
    they fork: in a rank, walking every logger or building a traitlets object would copy the
    memory pages they touch (~4 ms in a kernel with 360 loggers)."""

    handlers: list[tuple[logging.StreamHandler, str]]  # see console_handlers()
    display_publisher: Any  # a plain-text one for the kernel's shell; None outside a kernel


def find_inherited() -> Inherited:
    publisher = _forwarding_display_publisher()
    if publisher is not None and "tqdm.notebook" not in sys.modules and importlib.util.find_spec("tqdm") is not None:
        import tqdm.notebook  # noqa: F401 - in the rank, its bars become text bars (see detach_from_kernel)
    return Inherited(console_handlers(), publisher)


def console_handlers() -> list[tuple[logging.StreamHandler, str]]:
    """The logging handlers that write to this process's stdout or stderr, each with that
    stream's name. Found among every handler alive, which logging holds weakly (for its shutdown at
    exit): a few dozen, where a kernel has hundreds of loggers to walk."""
    streams = {id(getattr(sys, name)): name.strip("_") for name in ("stdout", "stderr", "__stdout__", "__stderr__")}
    alive = [ref() for ref in list(logging._handlerList)]
    return [
        (handler, streams[id(handler.stream)])
        for handler in alive
        if isinstance(handler, logging.StreamHandler)
        and not isinstance(getattr(type(handler), "stream", None), property)  # logging's last resort
        and id(handler.stream) in streams
    ]


def _forwarding_display_publisher() -> Any:
    """In a Jupyter kernel: a display publisher for its shell that, in a rank, sends each display
    to the launching process as a `Display` event (plain text on stdout where there is no channel)."""
    interactive = sys.modules.get("IPython.core.interactiveshell")
    if interactive is None or not interactive.InteractiveShell.initialized():
        return None
    return forwarding_publisher(interactive.InteractiveShell.instance())


@functools.cache
def forwarding_publisher(shell: Any) -> Any:
    """A display publisher for `shell` that, in a rank (rank_links), sends each display to the
    launching process as a `Display` event; elsewhere it publishes as the shell's own would."""
    from IPython.core.displaypub import DisplayPublisher

    class ForwardingDisplayPublisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):  # noqa: ANN001
            links = rank_links()
            if links is None:
                return super().publish(data, metadata, source, transient=transient, update=update, **kwargs)
            links.channel.send(Display(int(os.environ.get("RANK", 0)), dict(data), dict(metadata or {})))
            return None

        def clear_output(self, wait: bool = False) -> None:
            """A rank cannot clear the cell's output."""

    return ForwardingDisplayPublisher(shell=shell)


_TQDM_NOTEBOOK_METHODS = ("__init__", "__iter__", "status_printer", "display", "colour", "update", "close", "clear", "reset")


def detach_from_kernel(display_publisher: Any) -> None:
    """In a rank forked from a Jupyter kernel (whose sockets belong to the kernel): displays go to
    the launching process, tqdm's notebook bars (ipywidgets) fall back to its text bars, which
    reach the notebook as progress lines."""
    if display_publisher is None:
        return
    shell = display_publisher.shell
    keep(shell.display_pub)
    shell.display_pub = display_publisher
    for prompt in ("ps1", "ps2"):  # a rank is no interactive session (libraries check this)
        if hasattr(sys, prompt):
            keep(getattr(sys, prompt))
            delattr(sys, prompt)
    text_progress_bars()


_KEPT: list[Any] = []


def keep(*objects: Any) -> None:
    """Hold, for the rest of this process, inherited objects that a rank replaces: freeing them
    here would write to every memory page they and their parts occupy, and a forked rank copies
    each such page first (dropping tqdm's notebook methods alone cost a rank 0.4 ms)."""
    _KEPT.extend(objects)


def refuse_input() -> None:
    """input() and getpass() in a rank (forked, spawned or an engine's) raise at once, saying why:
    a kernel's would wait for a reply that never comes, and a plain one reads an empty stdin."""
    keep(builtins.input, getpass.getpass)
    builtins.input = getpass.getpass = _no_input


def _no_input(prompt: str = "", stream: Any = None) -> str:
    """input() and getpass() in a rank, whose stdin is empty: EOFError, as for a script run with
    its input from /dev/null."""
    raise EOFError("a rank has no input for input() or getpass() to read: ask before the ranks start (in the notebook, before the %%fabric cell)")


def text_progress_bars() -> None:
    """tqdm's notebook bars (ipywidgets, which a rank cannot show) draw as its text bars, which reach
    the notebook as progress lines: `tqdm.auto` and subclasses made earlier (Hugging Face's) too."""
    notebook_bars = sys.modules.get("tqdm.notebook")
    if notebook_bars is not None:
        methods = vars(notebook_bars.tqdm_notebook)
        for name in _TQDM_NOTEBOOK_METHODS:
            if name in methods:
                keep(methods[name])
                delattr(notebook_bars.tqdm_notebook, name)
