"""Notebook values sent to ranks in other interpreters (spawned, or a pool's engines): pickled once
with cloudpickle, which carries functions and classes defined in the notebook by value, together
with the notebook globals they reach. The bytes of tensor storages and large arrays stay out of
that pickle: they go to spawned ranks through shared memory (nbfabric.launcher.shared_tensors),
and inside the pickle elsewhere."""

from __future__ import annotations

import ctypes
import io
import linecache
import pickle
import sys
import types
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterable

import cloudpickle

from nbfabric.launcher import shared_tensors
from nbfabric.launcher.shared_tensors import LARGE


@dataclass(frozen=True)
class Shipment:
    """The pickled names, and those that could not be pickled (name -> why)."""

    data: bytes = b""
    names: tuple[str, ...] = ()
    left: dict[str, str] = field(default_factory=dict)

    sources: dict[str, list[str]] = field(default_factory=dict)  # file name -> lines, for tracebacks
    buffers: tuple[Any, ...] = ()  # the pickle's out-of-band buffers (large arrays), in its order
    storages: tuple[Any, ...] = ()  # the bytes of each tensor storage the pickle refers to
    arrived: bool = False  # unpickled in the receiving process
    mapping: tuple[str, int] | None = None  # arrived: this rank's link to the shared file, and its size

    def unpack(self) -> dict[str, Any]:
        """The values, in the receiving process (whose tracebacks can then show the notebook's lines).
        A spawned rank unpacks once: it maps the shared file (waiting until it is written) and
        removes its link to it."""
        if not self.arrived:  # still in the sending process: copies, as a receiving process gets them
            return pickle.loads(dumps(self)).unpack()
        for filename, lines in self.sources.items():
            linecache.cache.setdefault(filename, (sum(map(len, lines)), None, lines, filename))
        buffers, storages = self._blobs()
        token = _arriving.set(_Storages(storages))
        try:
            return pickle.loads(self.data, buffers=buffers) if self.data else {}
        finally:
            _arriving.reset(token)

    def _blobs(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """The buffers and storages; those given as (offset, size, read-only) are parts of this
        rank's private mapping of the shared file."""
        if self.mapping is None:
            return self.buffers, self.storages
        mapped = shared_tensors.map_file(*self.mapping)

        def part(blob: Any) -> Any:
            if not isinstance(blob, tuple):
                return blob
            offset, size, readonly = blob
            view = mapped[offset : offset + size]
            return view.toreadonly() if readonly else view

        return tuple(map(part, self.buffers)), tuple(map(part, self.storages))

    def refusal(self, where: str) -> str:
        """One message naming every name that cannot be shipped, and why."""
        lines = [f"cannot send to {where}: " + ", ".join(self.left)]
        lines += [f"  {name}: {why}" for name, why in self.left.items()]
        lines.append("Create these inside the cell, or leave them out of it.")
        return "\n".join(lines)

    def __reduce_ex__(self, protocol: int) -> tuple:
        """While spawned ranks start, large blobs go to a shared file (a link per rank, written once
        they have started); else, or if it lacks room, every blob goes inside the pickle."""
        fields = (self.data, self.names, self.left, self.sources)
        blobs = [memoryview(blob) for blob in (*self.buffers, *self.storages)]
        large = [index for index, blob in enumerate(blobs) if blob.nbytes >= LARGE]
        files = shared_tensors.placing()
        placed = files.place(self, [blobs[i] for i in large]) if files is not None and large else None
        offsets, mapping = {}, None
        if placed is not None:
            path, at, size = placed
            offsets, mapping = dict(zip(large, at)), (path, size)
        inside = [
            (offsets[i], blob.nbytes, blob.readonly) if i in offsets else _inside(blob, protocol) for i, blob in enumerate(blobs)
        ]
        count = len(self.buffers)
        return _arrive, (fields, inside[:count], inside[count:], mapping)


def _inside(blob: memoryview, protocol: int) -> Any:
    """`blob` as the pickle carries it: bytes if read-only, else a bytearray where it arrives."""
    if protocol >= 5:
        return pickle.PickleBuffer(blob)
    return bytes(blob) if blob.readonly else bytearray(blob)


def _arrive(fields: tuple, buffers: list, storages: list, mapping: tuple[str, int] | None = None) -> Shipment:
    """The shipment in the receiving process; the shared file is mapped when it is unpacked, where
    a failure is the rank's own, reported as any other."""
    return Shipment(*fields, tuple(buffers), tuple(storages), arrived=True, mapping=mapping)


class _Storages:
    """The storages of the shipment being unpacked, each made once: views share it as they did."""

    def __init__(self, blobs: tuple[Any, ...]):
        self.blobs, self.made = blobs, {}

    def get(self, index: int) -> Any:
        if index not in self.made:
            import torch

            blob = self.blobs[index]
            if isinstance(blob, memoryview):  # a part of the private mapping: used in place
                self.made[index] = torch.frombuffer(blob, dtype=torch.uint8).untyped_storage()
            else:  # inside the pickle: a storage of its own, as torch's pickling makes
                self.made[index] = torch.UntypedStorage.from_buffer(blob, dtype=torch.uint8)
        return self.made[index]


_arriving: ContextVar[_Storages] = ContextVar("nbfabric_arriving_storages")


def _storage(index: int, dtype: Any) -> Any:
    """Storage `index` of the shipment being unpacked; typed as `dtype` unless None."""
    import torch

    untyped = _arriving.get().get(index)
    return untyped if dtype is None else torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def ship(values: dict[str, Any], sources: Iterable[str] = ()) -> Shipment:
    """Pickle `values` in one go (objects shared between names stay shared). A value that cannot be
    pickled is found by pickling each name alone, on this failure path only; nothing is unpickled
    or compared, so no value is copied nor asked for its truth. `sources`: files (notebook cells)
    whose lines go along."""
    lines = {name: linecache.getlines(name) for name in sources}
    try:
        return _shipment(values, lines, {})
    except Exception:  # noqa: BLE001 - find which names fail
        pass
    left = {}
    for name, value in values.items():
        try:
            dumps(value)
        except Exception as exc:  # noqa: BLE001 - any pickling failure names the value
            left[name] = f"{type(exc).__name__}: {exc}"
    kept = {name: value for name, value in values.items() if name not in left}
    return _shipment(kept, lines, left)


def _shipment(values: dict[str, Any], sources: dict[str, list[str]], left: dict[str, str]) -> Shipment:
    buffer = io.BytesIO()
    pickler = _ShippingPickler(buffer)
    pickler.dump(values)
    return Shipment(buffer.getvalue(), tuple(values), left, sources, tuple(pickler.buffers), tuple(pickler.storages))


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, keeping the file name of code objects (tracebacks then name the notebook cell)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.CodeType) and obj.co_filename != _UNNAMED:
            return _named, (obj.replace(co_filename=_UNNAMED), obj.co_filename)
        return super().reducer_override(obj)


class _ShippingPickler(_Pickler):
    """Keeps out of the pickle the bytes of CPU tensor storages (each storage once, however many
    tensors view it) and large out-of-band buffers (numpy arrays). Large ones are read when the
    shipment is sent; smaller ones are copied now, as the pickle would have."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=5, buffer_callback=self._keep_buffer)
        self.buffers: list[memoryview] = []
        self.storages: list[Any] = []
        self._indices: dict[tuple[int, int], int] = {}  # (address, size) -> index in storages
        torch = sys.modules.get("torch")
        self._storage_types = (torch.storage.TypedStorage, torch.UntypedStorage) if torch is not None else ()

    def _keep_buffer(self, buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: inside the pickle
            return True
        if raw.nbytes < LARGE:
            return True
        self.buffers.append(raw)
        return False

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) in self._storage_types:
            typed = type(obj) is self._storage_types[0]
            untyped = obj._untyped_storage if typed else obj
            if untyped.device.type == "cpu" and untyped.nbytes() > 0:
                return _storage, (self._index(untyped), obj.dtype if typed else None)
        return super().reducer_override(obj)

    def _index(self, untyped: Any) -> int:
        key = (untyped.data_ptr(), untyped.nbytes())
        if key not in self._indices:
            self._indices[key] = len(self.storages)
            view = storage_bytes(untyped)
            self.storages.append(view if view.nbytes >= LARGE else bytearray(view))
        return self._indices[key]


def storage_bytes(untyped: Any) -> memoryview:
    """The bytes of a CPU storage, without a copy; the view keeps the storage alive."""
    array = (ctypes.c_ubyte * untyped.nbytes()).from_address(untyped.data_ptr())
    array.storage = untyped
    return memoryview(array).cast("B")


_UNNAMED = "<dynamic-code>"  # the name cloudpickle gives every code object it pickles


def _named(code: types.CodeType, filename: str) -> types.CodeType:
    return code.replace(co_filename=filename)


def dumps(value: Any) -> bytes:
    """cloudpickle's pickle of `value`, code objects keeping their file names."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=5).dump(value)
    return buffer.getvalue()
