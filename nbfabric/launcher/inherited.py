"""What a forked rank takes over from the process that forked it: the logging handlers of its
console, and (in a Jupyter kernel) a display publisher that writes plain text instead of using
the kernel's sockets. Found before forking; applied in the rank."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Inherited:
    """What a forked rank takes over from the launching process. Forking launches find it before
    they fork: in a rank, walking every logger or building a traitlets object would copy the
    memory pages they touch (~4 ms in a kernel with 360 loggers)."""

    handlers: list[tuple[logging.StreamHandler, str]]  # see console_handlers()
    display_publisher: Any  # a plain-text one for the kernel's shell; None outside a kernel


def find_inherited() -> Inherited:
    return Inherited(console_handlers(), _plain_display_publisher())


def console_handlers() -> list[tuple[logging.StreamHandler, str]]:
    """The logging handlers that write to this process's stdout or stderr, each with that
    stream's name."""
    streams = {id(getattr(sys, name)): name.strip("_") for name in ("stdout", "stderr", "__stdout__", "__stderr__")}
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [
        (handler, streams[id(handler.stream)])
        for logger in loggers
        for handler in getattr(logger, "handlers", ())
        if isinstance(handler, logging.StreamHandler)
        and not isinstance(getattr(type(handler), "stream", None), property)  # logging's last resort
        and id(handler.stream) in streams
    ]


def _plain_display_publisher() -> Any:
    """In a Jupyter kernel: a display publisher for its shell that writes plain text to stdout."""
    interactive = sys.modules.get("IPython.core.interactiveshell")
    if interactive is None or not interactive.InteractiveShell.initialized():
        return None
    from IPython.core.displaypub import DisplayPublisher

    return DisplayPublisher(shell=interactive.InteractiveShell.instance())


def detach_from_kernel(display_publisher: Any) -> None:
    """In a rank forked from a Jupyter kernel, rich display output becomes plain text on stdout
    (the kernel's sockets belong to the kernel)."""
    if display_publisher is None:
        return
    display_publisher.shell.display_pub = display_publisher
    for prompt in ("ps1", "ps2"):  # a rank is no interactive session (libraries check this)
        if hasattr(sys, prompt):
            delattr(sys, prompt)
