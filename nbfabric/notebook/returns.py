"""Carry the names a cell bound on rank 0 back to the notebook: on the CPU, picklable, bounded in size."""

from __future__ import annotations

import io
import pickle
import types
from dataclasses import dataclass, field
from typing import Any

import dill
import torch

from nbfabric.wrappers import unwrap

MAX_BYTES_PER_NAME = 2 * 1024**3  # a name whose pickle is larger stays in the rank
LAST_VALUE = "<last expression>"


@dataclass
class Returned:
    """The pickled values of a cell's names (one pickle each, sharing one memo) and what was skipped."""

    data: bytes = b""
    names: list[str] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # where each name's pickle ends in `data`
    modules: dict[str, str] = field(default_factory=dict)  # name -> module to import
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why

    def load(self) -> dict[str, Any]:
        """The values, in the notebook process; a name that cannot be rebuilt here joins `skipped`."""
        import importlib

        stream = io.BytesIO(self.data)
        unpickler = pickle.Unpickler(stream)
        values = {}
        for name, end in zip(self.names, self.ends):
            try:
                values[name] = unpickler.load()
            except Exception as exc:  # noqa: BLE001 - only this name is lost
                self.skipped[name] = f"cannot be loaded in the notebook: {type(exc).__name__}: {exc}"
                stream.seek(end)
        values.update({name: importlib.import_module(module) for name, module in self.modules.items()})
        return values


class _CellPickler(pickle.Pickler):
    """Pickles what already existed in the notebook by reference, what the cell created by value
    (dill), and tensors left on an accelerator as CPU copies."""

    def __init__(self, file: io.BytesIO, known: dict[str, Any]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._known_ids = {id(value) for value in known.values()}

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and obj.device.type not in ("cpu", "meta"):
            return obj.detach().cpu().__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        if isinstance(obj, (types.FunctionType, type)) and obj.__module__ == "__main__" and id(obj) not in self._known_ids:
            return dill.loads, (dill.dumps(obj, recurse=True),)
        return NotImplemented


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
        start = buffer.tell()
        try:
            pickler.dump(_on_cpu(value))
            why = "too large" if buffer.tell() - start > MAX_BYTES_PER_NAME else None
        except Exception as exc:  # noqa: BLE001 - any pickling failure only skips the name
            why = f"cannot be pickled: {type(exc).__name__}"
        if why is None:
            returned.names.append(name)
            returned.ends.append(buffer.tell())
            continue
        returned.skipped[name] = why
        buffer.seek(start)
        buffer.truncate()
        pickler.clear_memo()
    returned.data = buffer.getvalue()
    return returned


def _unwrap_any(value: Any) -> Any:
    """The user's module or optimizer behind the wrappers of nbfabric, DDP, Lightning or Accelerate."""
    while True:
        inner = unwrap(value)
        if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
            inner = inner.module
        elif isinstance(getattr(inner, "_original_module", None), torch.nn.Module):
            inner = inner._original_module
        elif isinstance(inner, torch.optim.Optimizer) and isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            inner = inner.optimizer
        if inner is value:
            return value
        value = inner


def _on_cpu(value: Any) -> Any:
    """Modules and optimizers as the user's own objects, moved to the CPU in place (keeping the
    parameters an optimizer refers to the same objects as the module's)."""
    value = _unwrap_any(value)
    if isinstance(value, torch.nn.Module):
        return value.cpu()
    if isinstance(value, torch.optim.Optimizer):
        for state in value.state.values():
            for key, tensor in state.items():
                if isinstance(tensor, torch.Tensor):
                    state[key] = tensor.cpu()
    return value
