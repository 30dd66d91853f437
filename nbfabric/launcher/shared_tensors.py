"""Large tensors and arrays on their way to spawned ranks: written once to a file in /dev/shm that
each rank maps privately (copy on write: what a rank writes stays its own) and then removes. The
file is written while the ranks' interpreters start; a rank waits for it on a lock."""

from __future__ import annotations

import fcntl
import mmap
import os
import sys
import threading
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

LARGE = 1 << 20  # bytes; a smaller tensor storage or array travels inside the pickle
SHM_DIR = "/dev/shm"
CHUNK = 64 << 20  # bytes written at a time: a stopped run stops the writing within one
ROOM_HINT = "More room in {} (docker run --shm-size=...) avoids this."

_placing: ContextVar[SharedFiles | None] = ContextVar("nbfabric_shared_files", default=None)


class SharedFiles:
    """The files of one launch: one per shipment, made (empty, locked) when the first rank's copy is
    pickled, and a hard link to it per rank, which the rank removes once it has mapped it. Once
    every rank is started, the shipment's own name goes and a thread writes the files; `remove`
    stops that thread and removes what is left, however the run ended."""

    def __init__(self, directory: str | None = None):
        self.directory = directory or SHM_DIR
        self._files: dict[int, tuple[object, _File | None]] = {}  # id(shipment) -> (shipment, its file)
        self._originals: list[str] = []  # each listed before it is made: an interrupt leaves none behind
        self._links: list[str] = []
        self._stopping = threading.Event()
        self._writer: threading.Thread | None = None

    @contextmanager
    def placing(self) -> Iterator[SharedFiles]:
        """While the ranks start: shipments pickled in this context put their large blobs in files,
        written when it ends (also when it ends by an error: `remove` then stops the writing)."""
        token = _placing.set(self)
        try:
            yield self
        finally:
            _placing.reset(token)
            for path in self._originals:
                _unlink(path)
            files = [file for _, file in self._files.values() if file is not None]
            if files:
                self._writer = threading.Thread(target=self._write, args=(files,), name="nbfabric-shared-files", daemon=True)
                self._writer.start()

    def place(self, shipment: object, blobs: list[memoryview]) -> tuple[str, list[int], int] | None:
        """For one rank: its own link to the file that will hold `blobs` (made at the first call for
        this shipment), each blob's offset and the file's size; None if they do not fit (say so once)."""
        if id(shipment) not in self._files:
            self._files[id(shipment)] = (shipment, self._make(blobs))
        file = self._files[id(shipment)][1]
        if file is None:
            return None
        link = f"{file.path}.{len(self._links)}"
        self._links.append(link)
        os.link(file.path, link)
        return link, file.offsets, file.size

    def remove(self) -> None:
        """Stop writing and remove every file of this launch that is still there."""
        self._stopping.set()
        if self._writer is not None:
            self._writer.join()
        for path in (*self._originals, *self._links):
            _unlink(path)

    def _make(self, blobs: list[memoryview]) -> _File | None:
        offsets, size = [], 0
        for blob in blobs:
            offsets.append(size)
            size += -(-blob.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        try:
            stats = os.statvfs(self.directory)
        except OSError as error:
            self._say(f"{self.directory} cannot be used: {error}")
            return None
        free = stats.f_bavail * stats.f_frsize
        if size > free // 2:  # the other half stays for the ranks (DataLoader workers and NCCL use it too)
            self._say(f"they need {_mb(size)} and {self.directory} has {_mb(free)} free (half of it may be used)")
            return None
        path = os.path.join(self.directory, f"nbfabric-ship-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        self._originals.append(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as error:
            self._say(f"{path} cannot be made: {error}")
            return None
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the file is written: ranks wait for it
        return _File(path, fd, blobs, offsets, size)

    def _write(self, files: list[_File]) -> None:
        for file in files:
            file.write(self._stopping, self.directory)

    def _say(self, why: str) -> None:
        print(
            f"nbfabric: the notebook's large tensors and arrays go to the spawned ranks through pipes, "
            f"which is slower: {why}. {ROOM_HINT.format(self.directory)}",
            file=sys.stderr,
        )


class _File:
    """One shipment's file, open and locked until written."""

    def __init__(self, path: str, fd: int, blobs: list[memoryview], offsets: list[int], size: int):
        self.path, self.fd, self.blobs, self.offsets, self.size = path, fd, blobs, offsets, size

    def write(self, stopping: threading.Event, directory: str) -> None:
        """Write the blobs, then give the file its full size, the sign that it is whole; if that
        fails or the run stops first, leave in it only why. Either way, release the ranks."""
        try:
            for blob, offset in zip(self.blobs, self.offsets):
                while blob.nbytes:
                    if stopping.is_set():
                        raise InterruptedError("the run ended first")
                    written = os.pwrite(self.fd, blob[:CHUNK], offset)
                    blob, offset = blob[written:], offset + written
            os.ftruncate(self.fd, self.size)
        except OSError as error:
            why = f"writing {_mb(self.size)} to {directory} failed: {error}. {ROOM_HINT.format(directory)}"
            try:
                os.ftruncate(self.fd, 0)
                os.write(self.fd, why.encode())  # at offset 0: the blobs were written with pwrite
            except OSError:
                pass
        finally:
            self.blobs = []
            os.close(self.fd)  # releases the lock


class NotDelivered(RuntimeError):
    """The launcher could not write the notebook's large values for the ranks."""


def placing() -> SharedFiles | None:
    """The launch whose ranks are being started in this context, if any."""
    return _placing.get()


def map_file(path: str, size: int) -> memoryview:
    """In a rank: once the launcher has written it, a private, copy-on-write mapping of `path`, which
    is then removed (this rank's link). Raises NotDelivered, saying why, if it could not be written."""
    try:
        fd = os.open(path, os.O_RDONLY)
    finally:
        _unlink(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits while the launcher writes
        written = os.fstat(fd).st_size
        if written != size:
            why = os.pread(fd, min(written, 4096), 0).decode(errors="replace") or "it was not written"
            raise NotDelivered(f"the notebook's large tensors and arrays did not reach this rank: {why}")
        return memoryview(mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE))
    finally:
        os.close(fd)


def _mb(size: int) -> str:
    return f"{size / 2**20:.0f} MB"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
