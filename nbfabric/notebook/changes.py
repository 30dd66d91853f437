"""Which of the notebook's values a cell changed in place, without binding their names (a list it
appended to, a model it trained through another name): a fingerprint of each value, its pickled
structure with tensors by identity and version counter, taken before and after."""

from __future__ import annotations

import hashlib
import io
import pickle
import types
from typing import Any, Iterable

import torch

LIMIT = 8 * 1024**2  # bytes of pickle per value: a larger value is not fingerprinted (too slow to compare)
_NOT_WATCHED = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)


class _TooLarge(Exception):
    pass


class _Digest(io.RawIOBase):
    """A file that hashes what is written to it, up to LIMIT bytes."""

    def __init__(self):
        self.hash = hashlib.blake2b(digest_size=16)
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.size += len(data)
        if self.size > LIMIT:
            raise _TooLarge
        self.hash.update(data)
        return len(data)


class _Fingerprinter(pickle.Pickler):
    """Pickles structure by value; a tensor as its identity, place and version counter (which every
    in-place change raises); functions, classes and modules as their identity."""

    def reducer_override(self, obj: Any) -> Any:
        if obj is _marker:  # by reference, as any function of a module
            return NotImplemented
        if isinstance(obj, torch.Tensor):
            return _marker, (_tensor_state(obj),)
        if isinstance(obj, _NOT_WATCHED):
            return _marker, (id(obj),)
        return NotImplemented


def _marker(*args: Any) -> None:
    """Never called: fingerprints are compared, not loaded."""


def _tensor_state(tensor: torch.Tensor) -> tuple:
    try:
        place = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())
    except (RuntimeError, NotImplementedError):  # sparse, nested and other layouts: their identity alone
        place = ()
    return (id(tensor), tensor._version, str(tensor.dtype), str(tensor.device), tensor.requires_grad, *place)


def fingerprint(value: Any) -> bytes | None:
    """A digest of `value`'s state that stays equal while nothing in it changes; None where it cannot
    be taken (a value that cannot be pickled, or one larger than LIMIT) or is not watched (functions,
    classes, modules)."""
    if isinstance(value, _NOT_WATCHED):
        return None
    digest = _Digest()
    try:
        _Fingerprinter(digest, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    except Exception:  # noqa: BLE001 - any value that cannot be pickled is not watched
        return None
    return digest.hash.digest()


def fingerprints(namespace: dict[str, Any], names: Iterable[str]) -> dict[str, bytes]:
    """name -> fingerprint for those of `names` in `namespace` that can be fingerprinted."""
    taken = {}
    for name in names:
        if name in namespace:
            digest = fingerprint(namespace[name])
            if digest is not None:
                taken[name] = digest
    return taken


def changed_in_place(namespace: dict[str, Any], known: dict[str, Any], before: dict[str, bytes]) -> list[str]:
    """The names of `before` that still hold the same object (`known`: the namespace then) and whose
    fingerprint has changed."""
    return [
        name
        for name, digest in before.items()
        if name in namespace and namespace[name] is known.get(name) and fingerprint(namespace[name]) != digest
    ]


def reached_names(names: Iterable[str], namespace: dict[str, Any]) -> set[str]:
    """`names`, and the globals that the notebook's functions among their values read, and so on:
    what a cell can change through the functions it calls."""
    reached: set[str] = set()
    todo = [name for name in names if name in namespace]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        value = namespace[name]
        function = getattr(value, "__func__", value)  # a bound method's function
        if isinstance(function, types.FunctionType) and function.__globals__ is namespace:
            todo += [read for read in _global_names(function.__code__) if read in namespace]
    return reached


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _global_names(constant)
    return names
