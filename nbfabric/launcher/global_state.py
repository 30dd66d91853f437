"""What a spawned rank takes over from the process that launched it, so that it starts as a forked
one would (and as Lightning's spawned ranks do): the random states of torch, NumPy and Python's
`random`, and torch's deterministic-algorithms and cuDNN settings."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GlobalState:
    torch_rng: Any
    python_rng: Any
    numpy_rng: Any  # None where NumPy was not imported
    cuda: Any  # the CUDA generators' states where CUDA is initialised here, else the seed they were given
    deterministic: tuple[bool, bool]  # use_deterministic_algorithms, and its warn_only
    cudnn: tuple[bool, bool]  # torch.backends.cudnn's benchmark and deterministic

    @classmethod
    def capture(cls) -> GlobalState:
        """This process's, read without initialising CUDA: before it is initialised, its generators
        hold the seed torch.manual_seed gave them (or torch's default), which is the CPU generator's
        initial seed."""
        import torch

        numpy = sys.modules.get("numpy")
        return cls(
            torch_rng=torch.get_rng_state(),
            python_rng=random.getstate(),
            numpy_rng=numpy.random.get_state() if numpy is not None else None,
            cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else torch.initial_seed(),
            deterministic=(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
            cudnn=(torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic),
        )

    def restore(self) -> None:
        """Make this process's state the captured one (CUDA's lazily, where it is not initialised)."""
        import torch

        torch.set_rng_state(self.torch_rng)
        random.setstate(self.python_rng)
        if self.numpy_rng is not None:
            import numpy

            numpy.random.set_state(self.numpy_rng)
        if isinstance(self.cuda, int):
            torch.cuda.manual_seed_all(self.cuda)
        else:
            torch.cuda.set_rng_state_all(self.cuda)
        torch.use_deterministic_algorithms(self.deterministic[0], warn_only=self.deterministic[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = self.cudnn
