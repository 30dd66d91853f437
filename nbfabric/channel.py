"""Typed, framed events sent from a rank to the launching process over a pipe."""

from __future__ import annotations

import os
import pickle
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

_HEADER = struct.Struct("!Q")


@dataclass(frozen=True)
class Metrics:
    """Values a rank logged with `fabric.log` / `fabric.log_dict`: (name, value, step, time) each."""

    rank: int
    points: list[tuple[str, Any, int | None, float]]


@dataclass(frozen=True)
class Result:
    """The pickled return value of a rank's function."""

    rank: int
    payload: bytes


@dataclass(frozen=True)
class Failure:
    """An exception that ended a rank, described in plain data."""

    rank: int
    exc_type: str
    message: str
    traceback: str
    time: float  # time.monotonic() in the rank, comparable across ranks of one machine
    distributed: bool  # raised by torch.distributed (often a consequence of another rank dying)

    @classmethod
    def from_exception(cls, rank: int, exc: BaseException) -> Failure:
        """`exc` as it ended rank `rank`, with the traceback of the user's frames."""
        from nbfabric.tracebacks import exception_message, raised_by_torch_distributed, user_traceback

        return cls(rank, type(exc).__qualname__, exception_message(exc), user_traceback(exc), now(), raised_by_torch_distributed(exc))


@dataclass(frozen=True)
class Display:
    """Rich output a rank displayed (a figure, a table): a MIME bundle, as IPython's display makes it."""

    rank: int
    data: dict[str, Any]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Left:
    """The rank's code called sys.exit (`code`) at `where`, ending its part of the run."""

    rank: int
    code: int
    where: str
    time: float


@dataclass(frozen=True)
class Exiting:
    """A rank's last message: it is done and exits with `code` as soon as its pipes are closed."""

    rank: int
    code: int


Event = Metrics | Result | Failure | Display | Left | Exiting


def frame(value: Any) -> bytes:
    """`value` pickled, after its length: what `FrameReader` reads back."""
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class ChannelWriter:
    """Rank side: writes whole frames to the pipe; blocking, so nothing is dropped; thread-safe."""

    def __init__(self, fd: int):
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, event: Event) -> None:
        view = memoryview(frame(event))
        with self._lock:
            while view:
                view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        os.close(self.fd)


class FrameReader:
    """Reassembles frames from the chunks read off a pipe or socket; `loads` unpickles each body
    (a memoryview, valid only during the call)."""

    def __init__(self, loads: Callable[[memoryview], Any] = pickle.loads):
        self._buffer = bytearray()
        self._loads = loads

    def feed(self, chunk: bytes) -> list[Any]:
        self._buffer += chunk
        values = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + size
            if len(self._buffer) < end:
                break
            with memoryview(self._buffer) as view, view[_HEADER.size : end] as body:
                values.append(self._loads(body))
            del self._buffer[:end]
        return values


def now() -> float:
    """A timestamp every process of this machine reads from the same clock."""
    return time.monotonic()
