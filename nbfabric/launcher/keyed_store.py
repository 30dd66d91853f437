"""The rendezvous store of a run on several nodes: a TCP server that admits only clients that know
the run's key, and the ranks' side of it (a torch.distributed Store).

A client proves it knows the key without sending it: the server opens with a random nonce, the
client answers with its own nonce and an HMAC-SHA256 over both, and the server, once satisfied,
proves the same to the client. A client that fails, or takes longer than HANDSHAKE_SECONDS, is
dropped before anything it sent is read as a request. Requests and answers are those of the
one-machine store (`rendezvous.StoreServer`); they are framed as plain values, unpickled with no
class admitted but ValueError. The key authenticates the run's processes; it does not encrypt
their traffic.
"""

from __future__ import annotations

import hmac
import importlib
import io
import os
import pickle
import secrets
import selectors
import socket
import threading
import time
import weakref
from datetime import timedelta
from hashlib import sha256
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlparse

import torch.distributed as dist

from nbfabric.channel import FrameReader, frame
from nbfabric.launcher.environment import RUN_KEY_ENV
from nbfabric.launcher.rendezvous import StoreServer
from nbfabric.launcher.store_client import SocketStore

MIN_KEY_LENGTH = 16
MAKE_A_KEY = 'python -c "import secrets; print(secrets.token_hex(16))"'
HANDSHAKE_SECONDS = 10.0

_HELLO = b"nbfabric-store/1\n"
_NONCE = 32


def new_run_key() -> str:
    """A fresh random key, for a run whose processes all start from here."""
    return secrets.token_hex(16)


def check_run_key(key: str | None, where: str) -> str:
    """`key` if it is one; else ValueError saying how to make one and where to give it."""
    if key and len(key) >= MIN_KEY_LENGTH:
        return key
    problem = "needs a run key" if not key else f"has a run key of {len(key)} characters; it needs {MIN_KEY_LENGTH} or more"
    raise ValueError(
        f"{where} {problem}, the same on every node, so that its store admits only the run's own processes: "
        f"make one with `{MAKE_A_KEY}` and give it as --run-key=KEY or in the environment variable {RUN_KEY_ENV}."
    )


def _proof(key: str, side: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(key.encode(), side + first + second, sha256).digest()


# ----------------------------------------------------------------- framing
class _PlainValues(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "ValueError"):  # the store's answer to an unknown operation
            return ValueError
        raise pickle.UnpicklingError(f"the run's store carries plain values only, not {module}.{name}")


def _plain_loads(body: memoryview) -> Any:
    return _PlainValues(io.BytesIO(body)).load()


class _SocketWriter:
    def __init__(self, sock: socket.socket):
        self._socket = sock

    def send(self, value: Any) -> None:
        self._socket.sendall(frame(value))


# ----------------------------------------------------------------- server
class _Client:
    def __init__(self, sock: socket.socket, nonce: bytes):
        self.socket = sock
        self.nonce = nonce
        self.deadline: float | None = time.monotonic() + HANDSHAKE_SECONDS  # None once admitted
        self.received = bytearray()
        self.reader = FrameReader(_plain_loads)

    def reply(self, request_id: int, value: Any) -> None:
        try:
            self.socket.sendall(frame((request_id, value)))
        except OSError:
            pass  # gone: its socket reads as closed next


class KeyedStoreServer:
    """The run's store, served on a thread from `address`:`port` only (never every interface);
    `close` ends it. OSError, saying what to change, if this machine cannot listen there."""

    def __init__(self, address: str, port: int, key: str):
        self._key = key
        try:
            family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
            self._listener = socket.create_server((address, port), family=family)
        except OSError as error:
            raise OSError(
                f"cannot serve the run's store at {address}:{port} ({error.strerror or error}): the main address must "
                "be an address of node 0 that every node reaches, and the port free there; set them with "
                "--main-address and --main-port"
            ) from None
        self._listener.setblocking(False)
        self.address = self._listener.getsockname()[:2]
        self._wake, self._woken = socket.socketpair()
        self._store = StoreServer()
        self._clients: dict[int, _Client] = {}
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._woken, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="nbfabric-run-store", daemon=True)
        self._thread.start()
        _serving.add(self)

    def close(self) -> None:
        """Stop serving and close every connection (once; later calls do nothing)."""
        if self not in _serving:
            return
        _serving.discard(self)
        if self._thread.is_alive():
            self._wake.send(b"x")
            self._thread.join()
        for client in list(self._clients.values()):
            self._drop(client)
        self._selector.close()
        for sock in (self._listener, self._wake, self._woken):
            sock.close()

    def _serve(self) -> None:
        while True:
            for key, _ in self._selector.select(self._next_deadline()):
                if key.fileobj is self._woken:
                    return
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fd in self._clients:
                    self._read(self._clients[key.fd])
            now = time.monotonic()
            for client in [c for c in self._clients.values() if c.deadline is not None and c.deadline <= now]:
                self._drop(client)

    def _next_deadline(self) -> float | None:
        deadlines = [c.deadline for c in self._clients.values() if c.deadline is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.settimeout(HANDSHAKE_SECONDS)  # bounds a send to a client that does not read
        client = _Client(sock, os.urandom(_NONCE))
        try:
            sock.sendall(_HELLO + client.nonce)
        except OSError:
            sock.close()
            return
        self._clients[sock.fileno()] = client
        self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, client: _Client) -> None:
        try:
            chunk = client.socket.recv(1 << 16)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(client)
        elif client.deadline is not None:
            self._handshake(client, chunk)
        else:
            self._serve_requests(client, chunk)

    def _handshake(self, client: _Client, chunk: bytes) -> None:
        client.received += chunk
        if len(client.received) < 2 * _NONCE:
            return
        theirs, proof = bytes(client.received[:_NONCE]), bytes(client.received[_NONCE : 2 * _NONCE])
        if len(client.received) > 2 * _NONCE or not hmac.compare_digest(proof, _proof(self._key, b"client", client.nonce, theirs)):
            self._drop(client)
            return
        client.deadline = None
        try:
            client.socket.sendall(_proof(self._key, b"server", theirs, client.nonce))
        except OSError:
            self._drop(client)

    def _serve_requests(self, client: _Client, chunk: bytes) -> None:
        try:
            for request in client.reader.feed(chunk):
                self._store.handle(client.socket.fileno(), request, client.reply)
        except Exception:  # noqa: BLE001 - not a request of this store's: the client goes, the store stays
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        fd = client.socket.fileno()
        self._clients.pop(fd, None)
        self._store.forget(fd)
        try:
            self._selector.unregister(client.socket)
        except (KeyError, ValueError):
            pass
        client.socket.close()


# ----------------------------------------------------------------- client
class KeyedStore(SocketStore):
    """A rank's side of `KeyedStoreServer`: waits (up to `timeout`) for the server to listen,
    proves the key, checks the server's proof; then a torch.distributed Store like any other."""

    def __init__(self, address: str, port: int, key: str, timeout: timedelta = timedelta(minutes=30)):
        where = f"the run's store at {address}:{port}"
        deadline = time.monotonic() + timeout.total_seconds()
        sock = _connect(address, port, deadline, where)
        try:
            _prove(sock, key, deadline, where)
        except BaseException:
            sock.close()
            raise
        super().__init__(sock, _SocketWriter(sock), FrameReader(_plain_loads), timeout, where)


def _connect(address: str, port: int, deadline: float, where: str) -> socket.socket:
    pause = 0.02
    while True:
        try:
            return socket.create_connection((address, port), timeout=max(0.1, deadline - time.monotonic()))
        except (ConnectionRefusedError, TimeoutError) as error:
            if time.monotonic() + pause > deadline:
                raise dist.DistStoreError(
                    f"nothing answered at {address}:{port} in time ({error}): is node 0 started, and are "
                    "--main-address and --main-port the same on every node?"
                ) from None
            time.sleep(pause)
            pause = min(2 * pause, 0.5)


def _receive(sock: socket.socket, size: int, deadline: float, where: str) -> bytes:
    data = b""
    while len(data) < size:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(size - len(data))
        except TimeoutError:
            raise dist.DistStoreError(f"{where} did not answer the key exchange in time") from None
        if not chunk:
            raise dist.DistStoreError(
                f"{where} refused this process: its run key is not the run's. Give every node the same "
                f"--run-key (or {RUN_KEY_ENV})."
            )
        data += chunk
    return data


def _prove(sock: socket.socket, key: str, deadline: float, where: str) -> None:
    deadline = min(deadline, time.monotonic() + HANDSHAKE_SECONDS)
    hello = _receive(sock, len(_HELLO) + _NONCE, deadline, where)
    if not hello.startswith(_HELLO):
        raise dist.DistStoreError(f"{where} is not an nbfabric run's store; is another program listening on that port?")
    server_nonce, nonce = hello[len(_HELLO) :], os.urandom(_NONCE)
    sock.sendall(nonce + _proof(key, b"client", server_nonce, nonce))
    if not hmac.compare_digest(_receive(sock, 32, deadline, where), _proof(key, b"server", nonce, server_nonce)):
        raise dist.DistStoreError(f"{where} does not know the run's key; is another program listening on that port?")


# ----------------------------------------------------------------- a rank joining the run
def keyed_rendezvous_wanted() -> bool:
    """Whether this rank meets through the keyed store: its environment holds the run's key, and
    torchrun's agent does not serve a store of its own at MASTER_PORT."""
    return RUN_KEY_ENV in os.environ and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


_joined: list[KeyedStore] = []  # per process: the store of its process group, kept alive for the C++ half torch holds


def join_run_store(rank: int, world_size: int, timeout: timedelta) -> tuple[KeyedStore, KeyedStoreServer | None]:
    """This rank's client of the run's store at MASTER_ADDR:MASTER_PORT, and the server if this is
    global rank 0, which serves it there (on that address only) for as long as it keeps it."""
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    key = check_run_key(os.environ.get(RUN_KEY_ENV), f"A run of {world_size} ranks")
    server = KeyedStoreServer(address, port, key) if rank == 0 else None
    try:
        store = KeyedStore(address, port, key, timeout)
        _joined[:] = [store]
        return store, server
    except BaseException:
        if server is not None:
            server.close()
        raise


_serving: weakref.WeakSet[KeyedStoreServer] = weakref.WeakSet()  # per process: the servers not closed yet


def close_servers() -> None:
    """Close every store this process serves (a pool rank leaving its process group, whose store goes with it)."""
    for server in list(_serving):
        server.close()


_env_servers: list[KeyedStoreServer] = []  # per process: what rank 0 serves for env://, kept for its life


def route_env_rendezvous() -> None:
    """torch's env:// rendezvous (`init_process_group()` without a store, as scripts written for
    torchrun call it) meets through the run's keyed store in this process, instead of torch's own
    store, which admits any client on every interface."""
    importlib.import_module("torch.distributed.rendezvous")._rendezvous_handlers["env"] = _env_rendezvous


def _env_rendezvous(url: str, timeout: timedelta = timedelta(minutes=30), **kwargs: Any) -> Iterator[tuple[KeyedStore, int, int]]:
    query = dict(parse_qsl(urlparse(url).query))
    rank, world_size = int(query.get("rank", os.environ["RANK"])), int(query.get("world_size", os.environ["WORLD_SIZE"]))
    store, server = join_run_store(rank, world_size, timeout)
    if server is not None:
        _env_servers.append(server)
    yield store, rank, world_size
    raise RuntimeError("the run's store cannot meet a second time through the same env:// rendezvous")
