"""How modules are replicated or sharded across ranks, and how ranks talk to each other."""

from __future__ import annotations

from nbfabric.config import RunConfig
from nbfabric.strategies.ddp import DDPStrategy, reduce_op_name
from nbfabric.strategies.fsdp import FSDP, FSDPStrategy
from nbfabric.strategies.single_device import SingleDeviceStrategy


def make_strategy(config: RunConfig, fsdp: FSDP | None = None) -> SingleDeviceStrategy:
    """The strategy object for a resolved configuration (FSDP with its options)."""
    if config.strategy == "fsdp":
        return FSDPStrategy(config.accelerator, config.device_ids, fsdp, config.precision)
    strategy = DDPStrategy if config.strategy == "ddp" else SingleDeviceStrategy
    return strategy(config.accelerator, config.device_ids)


__all__ = ["DDPStrategy", "FSDP", "FSDPStrategy", "SingleDeviceStrategy", "make_strategy", "reduce_op_name"]
