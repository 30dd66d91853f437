"""What a run on a pool engine writes, on its way to the notebook: sys.stdout and sys.stderr, and file
descriptors 1 and 2 (C libraries, subprocesses, os.write), as ("output", stream, text) events; with
the run's metrics and stacks, they travel on the engine's IOPub socket as ipyparallel data messages,
keyed by a sequence number, so that the notebook replays them in order into its Sink."""

from __future__ import annotations

import codecs
import ctypes
import os
import select
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

_BATCH_SECONDS = 0.02  # after sending a batch of events, the channel gathers the next one this long
_PIPE_GRACE = 0.2  # seconds a descriptor's pipe may take to empty after the run (a subprocess's last words)


class EngineChannel:
    """A rank's event channel on a pool engine. Events go out in batches, one data message each, keyed
    by its number: the first event after a quiet spell at once, then what came in the next
    _BATCH_SECONDS. A rank that prints thousands of lines a second then sends tens of messages, not
    thousands, which the engine's socket would drop past its high-water mark. One thread sends, so
    the messages leave in the order of their numbers."""

    def __init__(self):
        from ipykernel.zmqshell import ZMQInteractiveShell
        from jupyter_client.session import extract_header

        shell = ZMQInteractiveShell.instance()
        self._session, self._socket = shell.data_pub.session, shell.data_pub.pub_socket
        self._parent = extract_header(shell.kernel.get_parent("shell"))  # this run's request, for every thread
        self._batch: list[Any] = []
        self._closed = False
        self._arrived = threading.Condition()
        self._sender = threading.Thread(target=self._send_batches, name="nbfabric-events", daemon=True)
        self._sender.start()

    def send(self, event: Any) -> None:
        with self._arrived:
            self._batch.append(event)
            self._arrived.notify()

    def close(self) -> None:
        """Send what is left, then stop the sending thread."""
        with self._arrived:
            self._closed = True
            self._arrived.notify()
        self._sender.join()

    def _send_batches(self) -> None:
        from ipyparallel.serialize import serialize_object

        sequence = 0
        while True:
            with self._arrived:
                self._arrived.wait_for(lambda: self._batch or self._closed)
                batch, self._batch, closed = self._batch, [], self._closed
            if batch:
                key = str(sequence)
                sequence += 1
                buffers = serialize_object({key: batch})
                self._session.send(self._socket, "data_message", content={"keys": [key]}, parent=self._parent, buffers=buffers, ident=b"datapub")
            if closed:
                return
            time.sleep(_BATCH_SECONDS)  # what arrives meanwhile goes out as the next batch


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


@contextmanager
def output_to(channel: EngineChannel) -> Iterator[None]:
    """During the run, sys.stdout and sys.stderr write to `channel`, and so do descriptors 1 and 2."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _OutputStream(channel, "stdout", 1), _OutputStream(channel, "stderr", 2)
    try:
        with _descriptors_to(channel):
            yield
    finally:
        sys.stdout, sys.stderr = saved


@contextmanager
def _descriptors_to(channel: EngineChannel) -> Iterator[None]:
    """Descriptors 1 and 2 become pipes for the run, which a thread reads into `channel`; afterwards
    they are what they were. A subprocess the run left going keeps its pipe open: what it writes
    within _PIPE_GRACE s of the run's end still goes out, later words are not read."""
    for stream in (sys.__stdout__, sys.__stderr__):  # what the engine wrote before goes where it went
        if stream is not None:
            stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    readers: dict[int, str] = {}
    for fd, name in ((1, "stdout"), (2, "stderr")):
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        readers[read_end] = name
    stop_read, stop_write = os.pipe()
    thread = threading.Thread(target=_forward, args=(readers, stop_read, channel), name="nbfabric-descriptors", daemon=True)
    thread.start()
    try:
        yield
    finally:
        _flush_c_streams()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        thread.join(_PIPE_GRACE)  # the pipes end once no process holds them open
        os.write(stop_write, b"x")
        thread.join()
        for fd in (*readers, stop_read, stop_write):
            os.close(fd)


def _forward(readers: dict[int, str], stop: int, channel: EngineChannel) -> None:
    """Send what the pipes `readers` (read end -> stream) carry until they end, or until `stop` is
    written: then what they hold at that moment still goes."""
    decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in readers}
    open_ends = set(readers)
    while open_ends:
        ready = select.select([*open_ends, stop], [], [])[0]
        stopping = stop in ready
        for fd in sorted(open_ends) if stopping else ready:
            while select.select([fd], [], [], 0)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    open_ends.discard(fd)
                    break
                if text := decoders[fd].decode(chunk):
                    channel.send(("output", readers[fd], text))
                if not stopping:
                    break
        if stopping:
            return


def _flush_c_streams() -> None:
    """What C code printed into stdio's buffers, written out to the descriptors while they are pipes."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to ask (not on Linux or macOS)
        pass
