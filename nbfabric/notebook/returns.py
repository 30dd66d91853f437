"""Carry the names a cell bound on rank 0 back to the notebook: on the CPU (copies: the rank's own
objects stay as they are), picklable, bounded in size; a model sharded over the ranks is named."""

from __future__ import annotations

import io
import marshal
import pickle
import pickletools
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import torch

from nbfabric.launcher.shipping import storage_bytes
from nbfabric.wrappers import _identity, is_wrapped, unwrap, users_own

MAX_BYTES_PER_NAME = 2 * 1024**3  # a name whose pickle is larger stays in the rank
SHARDED = "held over the ranks by {how}; fabric.save(path, {{...}}) writes it whole"
LAST_VALUE = "<last expression>"


@dataclass
class Returned:
    """The pickled values of a cell's names (one pickle each, sharing one memo) and what was skipped."""

    data: bytes = b""
    names: list[str] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # where each name's pickle ends in `data`
    modules: dict[str, str] = field(default_factory=dict)  # name -> module to import
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why
    deleted: list[str] = field(default_factory=list)  # names the cell deleted (`del NAME`)

    def load(self) -> dict[str, Any]:
        """The values, in the notebook process; a name that cannot be rebuilt here joins `skipped`,
        and so does every later name that shares an object with it (never a wrong value)."""
        import importlib

        values = _Loader(self.data).load(self.names, self.ends, self.skipped)
        values.update({name: importlib.import_module(module) for name, module in self.modules.items()})
        return values


class _Loader:
    """One Unpickler over the names' pickles, which share one memo. After a name fails to load,
    a later name that reads a memo slot of it is skipped rather than given another object."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.stream = io.BytesIO(data)
        self.unpickler = pickle.Unpickler(self.stream)
        self.lost_slots: dict[str, set[int]] = {}  # name that did not arrive -> its memo slots

    def load(self, names: list[str], ends: list[int], skipped: dict[str, str]) -> dict[str, Any]:
        values, start = {}, 0
        for name, end in zip(names, ends):
            try:
                values[name] = self._load_one(start, end)
            except Exception as exc:  # noqa: BLE001 - only this name (and those sharing with it) is lost
                skipped[name] = str(exc) if isinstance(exc, _SharesLost) else f"cannot be loaded in the notebook: {type(exc).__name__}: {exc}"
                self._forget(name, start, end)
            start = end
        return values

    def _load_one(self, start: int, end: int) -> Any:
        if self.lost_slots:
            reads = memo_reads(self.data[start:end])
            sources = [name for name, slots in self.lost_slots.items() if slots & reads]
            if sources:
                raise _SharesLost(f"shares objects with {', '.join(sources)}, which did not arrive")
        self.stream.seek(start)
        return self.unpickler.load()

    def _forget(self, name: str, start: int, end: int) -> None:
        """Go on with a new Unpickler whose memo has placeholders in `name`'s slots, so that later
        slots keep the pickler's numbers."""
        first = memo_count(self.data[:start])
        slots = set(range(first, first + memo_count(self.data[start:end])))
        memo = {slot: value for slot, value in self.unpickler.memo.copy().items() if slot < first}
        memo.update(dict.fromkeys(slots))
        # The old Unpickler may hold the rest of a frame; the C one's memo cannot be set from a dict.
        self.unpickler = pickle._Unpickler(self.stream)
        self.unpickler.memo = memo
        self.lost_slots[name] = slots


class _SharesLost(Exception):
    """A name's pickle refers to an object of a name that did not arrive."""


def memo_count(data: memoryview) -> int:
    """How many objects the pickles in `data` (protocol 4+, back to back) put in the memo."""
    return sum(1 for opcode, _, _ in _ops(data) if opcode.name == "MEMOIZE")


def memo_reads(data: memoryview) -> set[int]:
    """The memo slots the pickles in `data` read."""
    return {arg for opcode, arg, _ in _ops(data) if opcode.name in ("GET", "BINGET", "LONG_BINGET")}


def _ops(data: memoryview):
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        yield from pickletools.genops(stream)


class _CellPickler(cloudpickle.Pickler):
    """Pickles what already existed in the notebook by reference, what the cell created by value
    (classes as cloudpickle does; functions, methods included, so that they read the notebook's
    globals once they are there), and tensors left on an accelerator as CPU copies. Tensors that
    share a storage (views, a parameter and a name for it) still share it in the notebook."""

    def __init__(self, file: io.BytesIO, known: dict[str, Any]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._known_names = {id(value): name for name, value in known.items()}

    def forget_since(self, written: memoryview) -> None:
        """Drop what a failed dump put in the memo: the memo again matches the pickles in `written`,
        so the notebook's one Unpickler numbers every later object as this pickler does."""
        kept = memo_count(written)
        self.memo = {key: entry for key, entry in self.memo.copy().items() if entry[0] < kept}

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, io.IOBase):  # cloudpickle would send an open file's contents, as a StringIO
            raise pickle.PicklingError(f"a{' closed' if obj.closed else 'n open'} file stays in the rank")
        if type(obj) is torch.storage.TypedStorage:  # a wrapper made anew for each tensor: its storage goes once
            return _typed_storage, (obj._untyped_storage, obj.dtype)
        if type(obj) is torch.UntypedStorage and obj.device.type == "cpu":
            return _untyped_storage, (pickle.PickleBuffer(storage_bytes(obj)) if obj.nbytes() else b"",)
        if isinstance(obj, torch.Tensor) and obj.device.type not in ("cpu", "meta"):
            copy = obj.detach().cpu()  # the rank's own tensor stays where it is (a pool's rank goes on with it)
            if type(obj) is torch.nn.Parameter:
                return torch.nn.Parameter, (copy, obj.requires_grad)
            return copy.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        if is_wrapped(obj):  # set up and held inside another value: the user's own, as a name's is
            return _identity, (users_own(obj),)
        if isinstance(obj, (types.FunctionType, type)) and getattr(obj, "__module__", None) == "__main__":
            if id(obj) in self._known_names:  # the notebook's own object, by the name it has there
                return _notebook_name, (self._known_names[id(obj)],)  # a spawned rank's __main__ does not hold it
            if isinstance(obj, types.FunctionType):
                return _notebook_function(obj)
        return super().reducer_override(obj)


def _notebook_name(name: str) -> Any:
    """In the notebook: the object its `name` holds (a class or function the cell used)."""
    namespace = vars(sys.modules["__main__"])
    if name not in namespace:
        raise LookupError(f"the notebook has no {name} any more")
    return namespace[name]


def _typed_storage(untyped: Any, dtype: Any) -> Any:
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _untyped_storage(data: bytes | bytearray) -> Any:
    return torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage()


class _EmptyCell:
    """Stands for a closure cell with nothing in it yet (pickled by reference, so it stays itself)."""


def _notebook_function(function: types.FunctionType) -> tuple:
    """Pickle a function defined by the cell: its code, defaults and closure by value, and for
    globals the dict of `__main__` where it is loaded, the notebook's, as for a function defined
    in a plain cell. The function is memoized before its state, so it may refer to itself."""
    closure = function.__closure__ or ()
    state = {
        "__defaults__": function.__defaults__,
        "__kwdefaults__": function.__kwdefaults__,
        "__dict__": function.__dict__,
        "__qualname__": function.__qualname__,
        "__doc__": function.__doc__,
        "__annotations__": function.__annotations__,
        "cells": [_cell_contents(cell) for cell in closure],
    }
    return _function_in_main, (marshal.dumps(function.__code__), function.__name__, len(closure)), state, None, None, _set_function_state


def _cell_contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a name the function closes over, not yet bound
        return _EmptyCell


def _function_in_main(code: bytes, name: str, cells: int) -> types.FunctionType:
    closure = tuple(types.CellType() for _ in range(cells)) or None
    return types.FunctionType(marshal.loads(code), sys.modules["__main__"].__dict__, name, None, closure)


def _set_function_state(function: types.FunctionType, state: dict[str, Any]) -> types.FunctionType:
    for cell, value in zip(function.__closure__ or (), state.pop("cells")):
        if value is not _EmptyCell:
            cell.cell_contents = value
    function.__dict__.update(state.pop("__dict__"))
    for attribute, value in state.items():
        setattr(function, attribute, value)
    return function


def pack(namespace: dict[str, Any], names: list[str], known: dict[str, Any], last_value: Any = None) -> Returned:
    """Pickle `names` from `namespace` (and the cell's last value); `known` is the namespace before the cell."""
    returned = Returned()
    buffer = io.BytesIO()
    pickler = _CellPickler(buffer, known)
    items = [(name, namespace[name]) for name in names if name in namespace]
    returned.skipped.update({name: "not defined" for name in names if name not in namespace})
    if last_value is not None:
        items.append((LAST_VALUE, last_value))
    for name, value in items:
        if isinstance(value, types.ModuleType):
            returned.modules[name] = value.__name__
            continue
        own = _unwrap_any(value)
        sharded = _sharded_parameters(own)
        if sharded:  # no pickling tried: it would fail, and torch would warn about it
            returned.skipped[name] = SHARDED.format(how=sharded)
            continue
        start = buffer.tell()
        try:
            pickler.dump(own)
            why = "too large" if buffer.tell() - start > MAX_BYTES_PER_NAME else None
        except Exception as exc:  # noqa: BLE001 - any pickling failure only skips the name
            engine = _deepspeed_engine(value)
            why = SHARDED.format(how=engine) if engine else f"cannot be pickled: {type(exc).__name__}: {exc}"
            if not engine and "ProcessGroup" in str(exc):  # a module a strategy set up keeps hooks into the run
                why = "holds the run's process group, as a module a strategy set up does; fabric.save(path, {...}) writes it whole"
        if why is None:
            returned.names.append(name)
            returned.ends.append(buffer.tell())
            continue
        returned.skipped[name] = why
        buffer.seek(start)
        buffer.truncate()
        with buffer.getbuffer() as written:
            pickler.forget_since(written)
    returned.data = buffer.getvalue()
    return returned


def _unwrap_any(value: Any) -> Any:
    """The user's module, optimizer or loader behind the wrappers of nbfabric, DDP, DeepSpeed, Lightning or Accelerate."""
    while True:
        inner = users_own(value)
        if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
            inner = inner.module
        elif isinstance(getattr(inner, "_original_module", None), torch.nn.Module):
            inner = inner._original_module
        elif type(inner).__name__ == "DeepSpeedEngine":
            inner = inner.module
        elif isinstance(inner, torch.optim.Optimizer) and isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            inner = inner.optimizer
        if inner is value:
            return value
        value = inner


def _sharded_parameters(value: Any) -> str:
    """How a module's or optimizer's parameters are split over the ranks ("FSDP", "DeepSpeed
    ZeRO-3"), or "" when each rank holds them whole."""
    if isinstance(value, torch.nn.Module):
        tensors = list(value.parameters())
    elif isinstance(value, torch.optim.Optimizer):
        tensors = [p for group in value.param_groups for p in group["params"]]
    else:
        return ""
    for tensor in tensors:
        if type(tensor).__name__ == "DTensor":
            return "FSDP"
        if hasattr(tensor, "ds_id"):
            return "DeepSpeed ZeRO-3"
    return ""


def _deepspeed_engine(value: Any) -> str:
    """"DeepSpeed ZeRO-2" for a module or optimizer that a DeepSpeed engine still holds, else ""."""
    inner = getattr(value, "_forward_module", None) or unwrap(value)  # a set-up module runs through its engine
    if not type(inner).__module__.startswith("deepspeed"):
        return ""
    stage = inner.zero_optimization_stage() if hasattr(inner, "zero_optimization_stage") else None
    return "DeepSpeed" if stage is None else f"DeepSpeed ZeRO-{stage}"
