"""`nbfabric consolidate`: a checkpoint directory, of either sharded format (torch.distributed.checkpoint's
or DeepSpeed's), made one file that `torch.load` and `fabric.load` read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from nbfabric.checkpoint import EXTRAS_FILE, atomic_save, shard_reader
from nbfabric.strategies.deepspeed_checkpoint import consolidate as consolidate_deepspeed, is_checkpoint as is_deepspeed


def consolidate(directory: str | os.PathLike, output: str | os.PathLike, *, trusted: bool = False) -> Path:
    """Turn a sharded checkpoint directory (FSDP's, or DeepSpeed's: the model's full fp32 weights) into
    one file that `torch.load` (and `fabric.load`) reads.
    `trusted`: the checkpoint's files may hold arbitrary Python objects (runs code from them)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    directory, output = Path(directory), Path(output)
    if is_deepspeed(directory):
        atomic_save(consolidate_deepspeed(directory, trusted=trusted), output)
        return output
    if not (directory / ".metadata").exists():
        raise ValueError(f"{directory} is not a sharded checkpoint (no .metadata file in it, nor a DeepSpeed checkpoint)")
    merged: dict[str, Any] = {}
    # as torch's own dcp_to_torch_save does, with the reader chosen here
    _load_state_dict(merged, storage_reader=shard_reader(directory, trusted=trusted), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    merged.update(torch.load(directory / EXTRAS_FILE, map_location="cpu", weights_only=not trusted))
    atomic_save(merged, output)
    return output
