"""A rank's side of a rendezvous store (see `rendezvous`): a torch.distributed Store, so that
`init_process_group(store=...)` and gloo or NCCL use it like any other. `SupervisorStore` reaches
the supervisor of one machine over the socket the rank inherited; `keyed_store.KeyedStore` reaches
the store of a run on several nodes over TCP."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Any, Protocol

import torch.distributed as dist

from nbfabric.channel import ChannelWriter, FrameReader
from nbfabric.launcher.rendezvous import finished_key


class Writer(Protocol):
    def send(self, value: Any) -> None: ...


class Reader(Protocol):
    def feed(self, chunk: bytes) -> list[Any]: ...


class SocketStore(dist.Store):
    """Each call is one request `(request_id, op, args)` over `sock`, and waits for its answer
    `(request_id, value)`; thread-safe. `name` says which store in errors."""

    def __init__(self, sock: socket.socket, writer: Writer, reader: Reader, timeout: timedelta, name: str):
        super().__init__()
        self.set_timeout(timeout)
        self._socket = sock
        self._writer = writer
        self._reader = reader
        self._name = name
        self._answers: list[tuple[int, Any]] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def set(self, key: str, value: Any) -> None:
        self._call("set", key, _as_bytes(value))

    def get(self, key: str) -> bytes:
        return self._call("get", key)

    def add(self, key: str, amount: int) -> int:
        return self._call("add", key, amount)

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        return self._call("compare_set", key, _as_bytes(expected), _as_bytes(desired))

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._call("wait", list(keys), timeout=timeout)

    def check(self, keys: list[str]) -> bool:
        return self._call("check", list(keys))

    def delete_key(self, key: str) -> bool:
        return self._call("delete_key", key)

    def num_keys(self) -> int:
        return self._call("num_keys")

    def _call(self, op: str, *args: Any, timeout: timedelta | None = None) -> Any:
        limit = (timeout or self.timeout).total_seconds()
        with self._lock:
            request_id = next(self._ids)
            self._writer.send((request_id, op, args))
            value = self._answer(request_id, time.monotonic() + limit if limit > 0 else None, op, args)
        if isinstance(value, Exception):
            raise value
        return value

    def _answer(self, request_id: int, deadline: float | None, op: str, args: tuple) -> Any:
        """Read answers until the one to `request_id` (an earlier call that timed out may answer first)."""
        while True:
            for index, (answered, value) in enumerate(self._answers):
                if answered == request_id:
                    del self._answers[index]
                    return value
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise dist.DistStoreError(f"{self._name} did not answer {op}{args!r} in time")
            self._socket.settimeout(remaining)
            try:
                chunk = self._socket.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                raise dist.DistStoreError(f"{self._name} closed (the process that served it ended)")
            self._answers += self._reader.feed(chunk)


class SupervisorStore(SocketStore):
    """The supervisor's store, over the socket this rank inherited (`fd`)."""

    def __init__(self, fd: int, timeout: timedelta = timedelta(minutes=30)):
        sock = socket.socket(fileno=os.dup(fd))
        super().__init__(sock, ChannelWriter(sock.fileno()), FrameReader(), timeout, "the launcher's rendezvous store")
        self.peers_finished = False  # every rank has finished its part: none needs this one any more

    def wait_for_peers(self, rank: int, world_size: int) -> None:
        """Say this rank is finished and wait until every rank is finished or has ended: a barrier
        of two requests to the supervisor, where a collective would take a round of messages
        between the ranks."""
        self.set(finished_key(rank), b"")
        self.wait([finished_key(peer) for peer in range(world_size)])
        self.peers_finished = True

    def wait_until_let_go(self, limit: float) -> None:
        """Stay, idle, until the supervisor closes its end of this socket, which it does once it has
        every rank's report, or for `limit` seconds."""
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            self._socket.settimeout(left)
            try:
                if not self._socket.recv(1 << 16):
                    return
            except OSError:  # the time is up, or the socket is gone
                return


def _as_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)
