"""What other libraries read to see this process's place in a run, set in each rank: Lightning's
rank-zero helpers (`rank_zero_only`, and the loggers built on it), which read the rank once, when
first imported (a rank forked from a process that had imported them would take itself for rank 0),
and Accelerate's flag for several processes on CPU, its precision and its state (so that a plain
`Accelerator()` joins the run as the run's settings say)."""

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


def accelerate_precision(precision: str) -> str:
    """Accelerate's `mixed_precision` for one of Lightning's precisions (its "no" for full precision
    and for 16-true, which Accelerate has not)."""
    return {"bf16-mixed": "bf16", "bf16-true": "bf16", "16-mixed": "fp16"}.get(precision, "no")


def tell_libraries(global_rank: int, world_size: int, accelerator: str, precision: str, *, new_rank: bool = True) -> None:
    """`new_rank`: this process is a rank of this run alone (not a pool's, whose state outlives it):
    Accelerate's state that it took over from the launching process (a notebook that made an
    `Accelerator()`, or Transformers' `TrainingArguments`) is dropped, so that an `Accelerator()`
    here sees this rank's place instead of the notebook's single process. An `Accelerator()` here
    takes the run's precision, as under `accelerate launch --mixed_precision`."""
    for name in _RANK_ZERO_MODULES:
        helper = getattr(sys.modules.get(name), "rank_zero_only", None)
        if helper is not None:
            helper.rank = global_rank
    if world_size > 1:  # a process of the run's own (one device runs in the launching process, left as it is)
        os.environ["ACCELERATE_MIXED_PRECISION"] = accelerate_precision(precision)
        if accelerator == "cpu":
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    state = sys.modules.get("accelerate.state")
    if new_rank and state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()
