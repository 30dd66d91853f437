"""What first initialised CUDA in this process (a cell line, or an import chain), so a refused fork can name it.

Every CUDA initialisation in PyTorch goes through `torch.cuda._lazy_init` (its C++ side calls it by
name), so wrapping it sees the first one; the wrapper only reads the caller's frames, once."""

from __future__ import annotations

import functools
import importlib
import os
import sys
from types import FrameType
from typing import Callable, NamedTuple

import torch

from nbfabric.launcher.cell_labels import place_label

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_IMPORTLIB = ("<frozen importlib.", os.path.dirname(importlib.__file__) + os.sep)


class _Frame(NamedTuple):
    filename: str
    line: int
    function: str
    module: str  # the frame's __name__

    @property
    def internal(self) -> bool:
        """torch's own frame or the import machinery's: never what the user looks for."""
        return self.filename.startswith((_TORCH_DIR, *_IMPORTLIB))


_first: tuple[_Frame, ...] | None = None  # the stack that first initialised CUDA, outermost frame first
_initialised_before = False  # CUDA was initialised before `install`


def install() -> None:
    """Wrap `_lazy_init` wherever torch holds it (torch.cuda and the submodules that imported it); once."""
    global _initialised_before
    original = torch.cuda._lazy_init
    if getattr(original, "_records_first_call", False):
        return
    _initialised_before = torch.cuda.is_initialized()
    recording = _recording(original)
    for name, module in list(sys.modules.items()):
        if (name == "torch" or name.startswith("torch.")) and getattr(module, "__dict__", {}).get("_lazy_init") is original:
            module._lazy_init = recording


def culprit() -> str:
    """One sentence on where CUDA was first initialised here, or "" when nbfabric did not see it."""
    if _initialised_before:
        return (
            "It was initialised before nbfabric was loaded: load nbfabric first (%load_ext nbfabric in the "
            "first cell, or the nbfabric kernel) to have this message name what initialises it."
        )
    place = _describe(_first) if _first is not None else ""
    return f"It was initialised {place}." if place else ""


def _recording(original: Callable[[], None]) -> Callable[[], None]:
    """`original`, which records the stack of the call that initialises CUDA when nothing is recorded yet."""
    @functools.wraps(original)
    def _lazy_init():
        global _first
        if _first is not None or _initialised_before:
            return original()
        was_initialised = torch.cuda.is_initialized()
        result = original()  # its errors reach the caller unchanged, and nothing is recorded
        if not was_initialised and _first is None and torch.cuda.is_initialized():
            _first = _stack(sys._getframe(1))
        return result

    _lazy_init._records_first_call = True
    return _lazy_init


def _stack(frame: FrameType | None) -> tuple[_Frame, ...]:
    frames = []
    while frame is not None:
        code = frame.f_code
        frames.append(_Frame(code.co_filename, frame.f_lineno or 0, code.co_name, str(frame.f_globals.get("__name__", ""))))
        frame = frame.f_back
    return tuple(reversed(frames))


def _describe(stack: tuple[_Frame, ...]) -> str:
    """"at Cell In[3], line 2", or "by import mylib (Cell In[3], line 1) → mylib/gpu.py, line 10": from
    the innermost cell (or script) frame, the modules imported from there, and the innermost frame;
    "" when every frame is torch's."""
    imported = {i for i, frame in enumerate(stack) if frame.function == "<module>" and i and stack[i - 1].internal}
    places = [i for i, frame in enumerate(stack) if not frame.internal]
    if not places:
        return ""
    cells = [i for i in places if _cell_label(stack[i])]
    scripts = [i for i in places if stack[i].module == "__main__"]
    start = (cells or scripts or places[:1])[-1]
    chain = [i for i in places if i > start and i in imported]
    inner = places[-1]
    if inner != start and (not chain or inner != chain[-1]):
        chain.append(inner)
    steps = " → ".join(_label(stack[i]) + ("" if i in imported else _in_function(stack[i])) for i in chain)
    if chain and chain[0] in imported:
        return f"by import {stack[chain[0]].module} ({_label(stack[start])}) → {steps}"
    return f"at {_label(stack[start])}" + (f" → {steps}" if steps else "")


def _in_function(frame: _Frame) -> str:
    return "" if frame.function == "<module>" else f", in {frame.function}"


def _cell_label(frame: _Frame) -> str:
    """"Cell In[3], line 2" for a frame in a notebook cell, else ""."""
    label = place_label(frame.filename, frame.line)
    return label if label.startswith("Cell In[") else ""


def _label(frame: _Frame) -> str:
    return _cell_label(frame) or f"{_short_path(frame.filename)}, line {frame.line}"


def _short_path(filename: str) -> str:
    """The file as imported ("mylib/gpu.py"): relative to the longest sys.path entry that holds it."""
    roots = [os.path.abspath(entry or os.curdir) + os.sep for entry in sys.path]
    root = max((r for r in roots if filename.startswith(r)), key=len, default="")
    return filename[len(root):]
