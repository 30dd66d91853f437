"""Handle widget messages (a Stop button's click) while a cell keeps the kernel's main thread busy.

The kernel reads the next request only between cells, so during a long cell a click waits. Here
the waiting messages are taken off the main shell stream: comm messages are handled at once, and
every other request goes to the kernel's own handler, which queues it to run after the cell, in order.
"""

from __future__ import annotations

import threading
from typing import Any

_COMM_MESSAGES = frozenset({"comm_open", "comm_msg", "comm_close"})


def handle_widget_messages() -> None:
    """Handle the comm messages waiting for this kernel; a no-op outside a kernel's main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    kernel = _kernel()
    stream = _main_shell_stream(kernel) if kernel is not None else None
    if stream is None:
        return
    import zmq

    queue_for_later, copy = stream._recv_callback, stream._recv_copy

    def receive(frames: list[Any]) -> Any:
        if _message_type(kernel, frames) not in _COMM_MESSAGES:
            return queue_for_later(frames)
        idents, parts = kernel.session.feed_identities(frames, copy=False)
        message = kernel.session.deserialize(parts, content=True, copy=False)
        try:
            kernel.shell_handlers[message["header"]["msg_type"]](kernel.shell_stream, idents, message)
        except Exception:
            kernel.log.error("error in a widget message handler", exc_info=True)
        return None

    stream.on_recv(receive, copy=False)
    try:
        stream.flush(zmq.POLLIN)
    finally:
        stream.on_recv(queue_for_later, copy=copy)


def _kernel() -> Any:
    from IPython import get_ipython

    return getattr(get_ipython(), "kernel", None)


def _main_shell_stream(kernel: Any) -> Any:
    """The stream the main shell reads requests from (ipykernel 7 puts a thread in front of it)."""
    channel_thread = getattr(kernel, "shell_channel_thread", None)
    if channel_thread is not None:
        return channel_thread.manager.get_shell_channel_to_subshell_pair(None).to_stream
    return getattr(kernel, "shell_stream", None)


def _message_type(kernel: Any, frames: list[Any]) -> str | None:
    """The message's type, read without unpacking its content (which would mark it as seen)."""
    try:
        _, parts = kernel.session.feed_identities(frames, copy=False)
        return kernel.session.deserialize(parts, content=False, copy=False)["header"]["msg_type"]
    except Exception:
        return None
