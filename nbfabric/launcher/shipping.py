"""Notebook values sent to ranks in other interpreters (spawned, or a pool's engines): pickled once
with cloudpickle, which carries functions and classes defined in the notebook by value, together
with the notebook globals they reach."""

from __future__ import annotations

import io
import linecache
import types
from dataclasses import dataclass, field
from typing import Any, Iterable

import cloudpickle


@dataclass(frozen=True)
class Shipment:
    """The pickled names, and those that could not be pickled (name -> why)."""

    data: bytes = b""
    names: tuple[str, ...] = ()
    left: dict[str, str] = field(default_factory=dict)

    sources: dict[str, list[str]] = field(default_factory=dict)  # file name -> lines, for tracebacks

    def unpack(self) -> dict[str, Any]:
        """The values, in the receiving process (whose tracebacks can then show the notebook's lines)."""
        for filename, lines in self.sources.items():
            linecache.cache.setdefault(filename, (sum(map(len, lines)), None, lines, filename))
        return cloudpickle.loads(self.data) if self.data else {}

    def refusal(self, where: str) -> str:
        """One message naming every name that cannot be shipped, and why."""
        lines = [f"cannot send to {where}: " + ", ".join(self.left)]
        lines += [f"  {name}: {why}" for name, why in self.left.items()]
        lines.append("Create these inside the cell, or leave them out of it.")
        return "\n".join(lines)


def ship(values: dict[str, Any], sources: Iterable[str] = ()) -> Shipment:
    """Pickle `values` in one go (objects shared between names stay shared). A value that cannot be
    pickled is found by pickling each name alone, on this failure path only; nothing is unpickled
    or compared, so no value is copied nor asked for its truth. `sources`: files (notebook cells)
    whose lines go along."""
    lines = {name: linecache.getlines(name) for name in sources}
    try:
        return Shipment(dumps(values), tuple(values), sources=lines)
    except Exception:  # noqa: BLE001 - find which names fail
        pass
    left = {}
    for name, value in values.items():
        try:
            dumps(value)
        except Exception as exc:  # noqa: BLE001 - any pickling failure names the value
            left[name] = f"{type(exc).__name__}: {exc}"
    kept = {name: value for name, value in values.items() if name not in left}
    return Shipment(dumps(kept), tuple(kept), left, lines)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, keeping the file name of code objects (tracebacks then name the notebook cell)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.CodeType) and obj.co_filename != _UNNAMED:
            return _named, (obj.replace(co_filename=_UNNAMED), obj.co_filename)
        return super().reducer_override(obj)


_UNNAMED = "<dynamic-code>"  # the name cloudpickle gives every code object it pickles


def _named(code: types.CodeType, filename: str) -> types.CodeType:
    return code.replace(co_filename=filename)


def dumps(value: Any) -> bytes:
    """cloudpickle's pickle of `value`, code objects keeping their file names."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=5).dump(value)
    return buffer.getvalue()
