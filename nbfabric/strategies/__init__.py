"""How modules are replicated or sharded across ranks, and how ranks talk to each other."""

from __future__ import annotations

import torch

from nbfabric.config import RunConfig
from nbfabric.strategies.ddp import REDUCE_OPS, DDPStrategy
from nbfabric.strategies.fsdp import FSDP, FSDPStrategy
from nbfabric.strategies.single_device import SingleDeviceStrategy


def make_strategy(config: RunConfig, fsdp: FSDP | None = None) -> SingleDeviceStrategy:
    """The strategy object for a resolved configuration (FSDP with its options)."""
    device = torch.device(config.accelerator)
    if config.strategy == "fsdp":
        return FSDPStrategy(device, fsdp, config.precision)
    return DDPStrategy(device) if config.strategy == "ddp" else SingleDeviceStrategy(device)


__all__ = ["DDPStrategy", "FSDP", "FSDPStrategy", "SingleDeviceStrategy", "make_strategy", "REDUCE_OPS"]
