"""Seed every random number generator a training run uses."""

from __future__ import annotations

import random
import sys

import torch


def seed_everything(seed: int | None = None, workers: bool = False) -> int:
    """Seed Python's `random`, NumPy (if imported) and torch; return the seed (0 when none is given).

    DataLoader workers get distinct seeds derived from it by torch itself; `workers` is
    accepted for compatibility with Lightning and changes nothing.
    """
    seed = 0 if seed is None else int(seed)
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed
