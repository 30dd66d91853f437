"""Save and load checkpoints: written atomically, read with `weights_only` by default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from nbfabric.wrappers import unwrap


def to_state(state: dict[str, Any]) -> dict[str, Any]:
    """Modules, optimizers and anything else with `state_dict()` replaced by their state."""
    converted = {}
    for key, value in state.items():
        value = unwrap(value)
        converted[key] = value.state_dict() if hasattr(value, "state_dict") else value
    return converted


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file beside `path`, then rename: `path` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def load_into(path: str | os.PathLike, state: dict[str, Any] | None, *, strict: bool, weights_only: bool) -> dict[str, Any]:
    """Load `path`; restore each object in `state` in place and return what the checkpoint had besides."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    if state is None:
        return checkpoint
    missing = [key for key in state if key not in checkpoint]
    if strict and missing:
        raise KeyError(
            f"the checkpoint {os.fspath(path)!r} has no entry for {', '.join(map(repr, missing))}; "
            f"it has {', '.join(map(repr, checkpoint))}. Pass strict=False to load what is there."
        )
    for key in [key for key in state if key in checkpoint]:
        target = unwrap(state[key])
        if isinstance(target, torch.nn.Module):
            target.load_state_dict(checkpoint.pop(key), strict=strict)
        elif hasattr(target, "load_state_dict"):
            target.load_state_dict(checkpoint.pop(key))
        else:
            state[key] = checkpoint.pop(key)
    return checkpoint
