"""Lightning's rank-zero helpers (`rank_zero_only`, and the loggers built on it) told which rank
this process is: they read the rank once, when first imported, so a rank forked from a process
that had imported them would otherwise take itself for rank 0."""

from __future__ import annotations

import sys

_MODULES = (
    "lightning_utilities.core.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "pytorch_lightning.utilities.rank_zero",
)


def tell_rank_zero_helpers(rank: int) -> None:
    for name in _MODULES:
        helper = getattr(sys.modules.get(name), "rank_zero_only", None)
        if helper is not None:
            helper.rank = rank
