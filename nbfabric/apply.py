"""Functions applied through nested collections (dicts, lists, tuples, namedtuples, dataclasses),
with the traversal Lightning uses (`lightning_utilities.apply_to_collection`)."""

from __future__ import annotations

import sys
from abc import ABC
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection

__all__ = ["apply_to_collection", "as_tensors", "convert_floats", "move_to_device", "to_scalars"]


class _Movable(ABC):
    """Anything with a callable `.to`: tensors, modules, Hugging Face's BatchEncoding, user classes."""

    @classmethod
    def __subclasshook__(cls, subclass: type) -> Any:
        return callable(getattr(subclass, "to", None)) if cls is _Movable else NotImplemented


def move_to_device(data: Any, device: torch.device | str) -> Any:
    """Every object with a `.to()` in `data` moved to `device` (an in-place `.to` that returns None keeps the object)."""
    device = torch.device(device)
    blocking = device.type in ("cpu", "mps")

    def move(item: Any) -> Any:
        moved = item.to(device, non_blocking=True) if isinstance(item, torch.Tensor) and not blocking else item.to(device)
        return item if moved is None else moved

    return apply_to_collection(data, _Movable, move)


def as_tensors(data: Any, device: torch.device) -> Any:
    """Numbers become tensors as Lightning makes them (bool: uint8, int: int32, float: float32),
    numpy arrays tensors; all on `device`."""
    for kind, dtype in ((bool, torch.uint8), (int, torch.int32), (float, torch.float32)):
        data = apply_to_collection(data, kind, lambda x, dtype=dtype: torch.tensor(x, dtype=dtype, device=device))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        data = apply_to_collection(data, numpy.ndarray, lambda array: torch.from_numpy(array).to(device))
    return move_to_device(data, device)


def to_scalars(data: Any) -> Any:
    """Every tensor in `data` as its Python number; ValueError for a tensor of more than one element."""

    def item(tensor: torch.Tensor) -> Any:
        if tensor.numel() != 1:
            raise ValueError(f"The metric `{tensor}` does not contain a single element, thus it cannot be converted to a scalar.")
        return tensor.item()

    return apply_to_collection(data, torch.Tensor, item)


def convert_floats(data: Any, dtype: torch.dtype) -> Any:
    """Every floating-point tensor in `data` converted to `dtype`; other tensors unchanged."""
    return apply_to_collection(data, torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t)
