"""How modules are replicated or sharded across ranks, and how ranks talk to each other."""

from nbfabric.strategies.ddp import REDUCE_OPS, DDPStrategy
from nbfabric.strategies.single_device import SingleDeviceStrategy

STRATEGIES = {"single_device": SingleDeviceStrategy, "ddp": DDPStrategy}

__all__ = ["DDPStrategy", "SingleDeviceStrategy", "STRATEGIES", "REDUCE_OPS"]
