"""What other libraries read to see this process's place in a run, set in each rank: Lightning's
rank-zero helpers (`rank_zero_only`, and the loggers built on it), which read the rank once, when
first imported (a rank forked from a process that had imported them would take itself for rank 0),
and Accelerate's flag for several processes on CPU (so that a plain `Accelerator()` joins the run)."""

from __future__ import annotations

import os
import sys

_RANK_ZERO_MODULES = (
    "lightning_utilities.core.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "pytorch_lightning.utilities.rank_zero",
)


def tell_libraries(global_rank: int, world_size: int, accelerator: str) -> None:
    for name in _RANK_ZERO_MODULES:
        helper = getattr(sys.modules.get(name), "rank_zero_only", None)
        if helper is not None:
            helper.rank = global_rank
    if world_size > 1 and accelerator == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
