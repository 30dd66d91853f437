"""Large tensors and arrays on their way to spawned ranks: written once to a file in /dev/shm that
each rank maps privately (copy on write: what a rank writes stays its own) and then removes."""

from __future__ import annotations

import mmap
import os
import sys
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

LARGE = 1 << 20  # bytes; a smaller tensor storage or array travels inside the pickle
SHM_DIR = "/dev/shm"

_placing: ContextVar[SharedFiles | None] = ContextVar("nbfabric_shared_files", default=None)


class SharedFiles:
    """The files of one launch: one per shipment, written when the first rank's copy is pickled, and
    a hard link to it per rank, which the rank removes once it has mapped it. The shipment's own
    file goes once every rank is started, and `remove` removes what is left however the run ended."""

    def __init__(self, directory: str | None = None):
        self.directory = directory or SHM_DIR
        self._files: dict[int, tuple[object, tuple[str, list[int], int] | None]] = {}  # id -> (shipment, written)
        self._originals: list[str] = []  # each listed before it is made: an interrupt leaves none behind
        self._links: list[str] = []

    @contextmanager
    def placing(self) -> Iterator[SharedFiles]:
        """While the ranks start: shipments pickled in this context put their large blobs in files."""
        token = _placing.set(self)
        try:
            yield self
        finally:
            _placing.reset(token)
            for path in self._originals:
                _unlink(path)

    def place(self, shipment: object, blobs: list[memoryview]) -> tuple[str, list[int], int] | None:
        """For one rank: its own link to the file holding `blobs` (written at the first call for this
        shipment), each blob's offset and the file's size; None if they do not fit (say so once)."""
        if id(shipment) not in self._files:
            self._files[id(shipment)] = (shipment, self._write(blobs))
        written = self._files[id(shipment)][1]
        if written is None:
            return None
        path, offsets, size = written
        link = f"{path}.{len(self._links)}"
        self._links.append(link)
        os.link(path, link)
        return link, offsets, size

    def remove(self) -> None:
        """Remove every file of this launch that is still there."""
        for path in (*self._originals, *self._links):
            _unlink(path)

    def _write(self, blobs: list[memoryview]) -> tuple[str, list[int], int] | None:
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
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # no room shows here, as an error, never later in a rank
            for blob, offset in zip(blobs, offsets):
                while blob.nbytes:
                    written = os.pwrite(fd, blob, offset)
                    blob, offset = blob[written:], offset + written
        except OSError as error:
            _unlink(path)
            self._say(f"writing {_mb(size)} to {self.directory} failed: {error}")
            return None
        finally:
            os.close(fd)
        return path, offsets, size

    def _say(self, why: str) -> None:
        print(
            f"nbfabric: the notebook's large tensors and arrays go to the spawned ranks through pipes, "
            f"which is slower: {why}. More room in {self.directory} (docker run --shm-size=...) avoids this.",
            file=sys.stderr,
        )


def placing() -> SharedFiles | None:
    """The launch whose ranks are being started in this context, if any."""
    return _placing.get()


def map_file(path: str, size: int) -> memoryview:
    """In a rank: a private, copy-on-write mapping of `path`, which is then removed (this rank's link)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    finally:
        _unlink(path)
    try:
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
