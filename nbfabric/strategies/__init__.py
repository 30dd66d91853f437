"""How modules are replicated or sharded across ranks, and how ranks talk to each other."""

from __future__ import annotations

from functools import partial
from typing import Any

from nbfabric.config import RunConfig
from nbfabric.strategies.ddp import DDPStrategy, reduce_op_name
from nbfabric.strategies.deepspeed import NAMED_STAGES, DeepSpeedStrategy
from nbfabric.strategies.fsdp import FSDP, FSDPStrategy
from nbfabric.strategies.single_device import SingleDeviceStrategy


_BY_NAME = {
    "single_device": SingleDeviceStrategy,
    "ddp": DDPStrategy,
    "ddp_find_unused_parameters_true": DDPStrategy,
    "fsdp": FSDPStrategy,
    **{name: partial(DeepSpeedStrategy.named, name) for name in NAMED_STAGES},
}


def strategy_name(strategy: Any) -> Any:
    """What RunConfig.resolve takes for `Fabric(strategy=...)`: a name as given, or the name of a strategy object or FSDP options."""
    if isinstance(strategy, FSDP):
        return "fsdp"
    return strategy.name if isinstance(strategy, SingleDeviceStrategy) else strategy


def make_strategy(config: RunConfig, given: Any = None) -> SingleDeviceStrategy:
    """The strategy for a resolved configuration: the one the user made (or FSDP options), bound to it."""
    if isinstance(given, FSDP):
        given = FSDPStrategy(given)
    if not isinstance(given, SingleDeviceStrategy):
        given = _BY_NAME[config.strategy]()
    return given.bind(config)


__all__ = ["DDPStrategy", "DeepSpeedStrategy", "FSDP", "FSDPStrategy", "SingleDeviceStrategy", "make_strategy", "reduce_op_name", "strategy_name"]
