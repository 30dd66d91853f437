"""What a run on a pool engine writes, on its way to the notebook: sys.stdout and sys.stderr, and file
descriptors 1 and 2 (C libraries, subprocesses, os.write), as ("output", stream, text) events; with
the run's metrics and stacks, they travel on the engine's IOPub socket as ipyparallel data messages,
keyed by a sequence number, so that the notebook replays them in order into its Sink.

One thread per engine, started with its first run and kept, reads the descriptors' pipes and sends
the events in batches: the first event after a quiet spell at once, then what came in the next
_BATCH_SECONDS. A rank that prints thousands of lines a second then sends tens of messages, not
thousands, which the engine's socket would drop past its high-water mark; and, one sender, the
messages leave in the order of their numbers."""

from __future__ import annotations

import codecs
import ctypes
import fcntl
import functools
import os
import select
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from nbfabric.launcher.inherited import forwarding_publisher

_BATCH_SECONDS = 0.02  # after sending a batch of events, the thread gathers the next one this long
_PIPE_BYTES = 1 << 20  # each descriptor's pipe holds this much before a writer waits for the thread
_STREAMS = {1: "stdout", 2: "stderr"}


class EngineChannel:
    """A run's event channel on a pool engine: what it is sent goes out with the run's request as
    parent; `close` returns once all of it, and what the run wrote to descriptors 1 and 2, is sent."""

    def __init__(self):
        from jupyter_client.session import extract_header

        shell = _engine_shell()
        self._forwarder = _forwarder()
        self._forwarder.begin(shell.data_pub.session, shell.data_pub.pub_socket, extract_header(shell.kernel.get_parent("shell")))

    def send(self, event: Any) -> None:
        self._forwarder.add(event)

    def close(self) -> None:
        self._forwarder.end()


class _Forwarder:
    """The engine's thread that sends runs' events, and the pipes that stand for its descriptors 1
    and 2 during a run (`output_to`). The thread reads the pipes and takes batches with the lock
    held, so that `end` sees all that a run wrote either in the pipes or in the batch."""

    def __init__(self):
        self.write_ends: dict[int, int] = {}
        self._names: dict[int, str] = {}
        for fd, name in _STREAMS.items():
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            try:
                fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_BYTES)
            except OSError:  # a smaller limit (/proc/sys/fs/pipe-max-size): the default size serves
                pass
            self.write_ends[fd], self._names[read_end] = write_end, name
        self._decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in self._names}
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._lock = threading.Condition()
        self._batch: list[Any] = []
        self._run: tuple[Any, Any, dict] | None = None  # the current run's session, socket and parent header
        self._sequence = 0  # the number of the current run's next message
        self._flushes_asked = self._flushes_done = 0
        self._sending = False  # the thread has taken a batch that it has not sent yet
        threading.Thread(target=self._serve, name="nbfabric-events", daemon=True).start()

    def begin(self, session: Any, socket: Any, parent: dict) -> None:
        with self._lock:
            self._batch.clear()
            self._run, self._sequence = (session, socket, parent), 0

    def add(self, event: Any) -> None:
        with self._lock:
            if self._run is None:
                return  # a thread of an ended run: nobody listens for it
            self._batch.append(event)
            if len(self._batch) == 1:
                os.write(self._wake_write, b"e")

    def end(self) -> None:
        """Once the run's descriptors are back (`output_to`): send what the pipes and the batch hold.
        Where they hold nothing and no batch is on its way, nothing need wait for the thread."""
        with self._lock:
            if not self._batch and not self._sending and not select.select(list(self._names), [], [], 0)[0]:
                self._run = None
                return
            self._flushes_asked += 1
            asked = self._flushes_asked
            os.write(self._wake_write, b"f")
            self._lock.wait_for(lambda: self._flushes_done >= asked)
            self._run = None

    def _serve(self) -> None:
        from ipyparallel.serialize import serialize_object

        watched = [*self._names, self._wake_read]
        next_send = 0.0
        while True:
            with self._lock:
                waiting = bool(self._batch)
            timeout = max(0.0, next_send - time.monotonic()) if waiting else None
            ready = select.select(watched, [], [], timeout)[0]
            if self._wake_read in ready:
                os.read(self._wake_read, 1 << 12)
            with self._lock:
                flush = self._flushes_asked > self._flushes_done
                for fd in self._names:  # after a flush request, the run has given its descriptors back: all it wrote is here
                    if flush or fd in ready:
                        self._read(fd)
                batch, run, key = [], self._run, str(self._sequence)
                if self._batch and (flush or time.monotonic() >= next_send):
                    batch, self._batch = self._batch, []
                    self._sequence += 1
                    self._sending = True
            if batch:
                session, socket, parent = run
                session.send(socket, "data_message", content={"keys": [key]}, parent=parent, buffers=serialize_object({key: batch}), ident=b"datapub")
                next_send = time.monotonic() + _BATCH_SECONDS
            with self._lock:
                self._sending = False
                if flush:
                    self._flushes_done = self._flushes_asked
                    self._lock.notify_all()

    def _read(self, fd: int) -> None:
        """What pipe `fd` holds now, as events of its stream (with the lock held)."""
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                return
            text = self._decoders[fd].decode(chunk)
            if text and self._run is not None:
                self._batch.append(("output", self._names[fd], text))


@functools.cache
def _forwarder() -> _Forwarder:
    """This engine's, made with its first run."""
    return _Forwarder()


class _OutputStream:
    """sys.stdout / sys.stderr during a run: each write is an event (the notebook joins them into
    lines). Its file descriptor is 1 or 2, which the run's output reaches too."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, channel: EngineChannel, name: str, fd: int):
        self._channel, self.name, self._fd = channel, name, fd
        self.buffer = _BinaryOutput(self)

    def write(self, text: str) -> int:
        if text:
            self._channel.send(("output", self.name, text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Each write has gone to the channel already."""

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd


class _BinaryOutput:
    """sys.stdout.buffer: bytes, decoded as UTF-8 (a character split between writes joined again)."""

    def __init__(self, text: _OutputStream):
        self._text = text
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def write(self, data: bytes) -> int:
        self._text.write(self._decoder.decode(bytes(data)))
        return len(data)

    def flush(self) -> None:
        """Nothing is held back but an unfinished character."""

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._text.fileno()


def _engine_shell() -> Any:
    from ipykernel.zmqshell import ZMQInteractiveShell

    return ZMQInteractiveShell.instance()


@contextmanager
def output_to(channel: EngineChannel) -> Iterator[None]:
    """During the run, sys.stdout, sys.stderr and display() write to `channel`, and so do descriptors 1 and 2
    (pipes that the engine's thread reads); afterwards they are what they were. A subprocess the run
    left going keeps writing into the pipe: what it writes before the run ends goes out with it."""
    for stream in (sys.__stdout__, sys.__stderr__):  # what the engine wrote before goes where it went
        if stream is not None:
            stream.flush()
    saved = sys.stdout, sys.stderr
    descriptors = {fd: os.dup(fd) for fd in _STREAMS}
    for fd, write_end in _forwarder().write_ends.items():
        os.dup2(write_end, fd)
    sys.stdout, sys.stderr = _OutputStream(channel, "stdout", 1), _OutputStream(channel, "stderr", 2)
    shell = _engine_shell()
    publisher = shell.display_pub
    shell.display_pub = forwarding_publisher(shell)  # display() goes to the notebook as a forked rank's does
    try:
        yield
    finally:
        shell.display_pub = publisher
        sys.stdout, sys.stderr = saved
        _flush_c_streams()
        for fd, copy in descriptors.items():
            os.dup2(copy, fd)
            os.close(copy)


@functools.cache
def _c_library() -> Any:
    try:
        return ctypes.CDLL(None)
    except OSError:  # none to ask (not on Linux or macOS)
        return None


def _flush_c_streams() -> None:
    """What C code printed into stdio's buffers, written out to the descriptors while they are pipes."""
    library = _c_library()
    if library is not None:
        library.fflush(None)
