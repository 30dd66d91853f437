"""Seed every random number generator a training run uses, as Lightning's seed_everything does."""

from __future__ import annotations

import logging
import os
import random
import sys

import torch

from nbfabric.dataloaders import SEED_VARIABLE

_log = logging.getLogger("nbfabric")


def seed_everything(seed: int | None = None, workers: bool = False, verbose: bool = True) -> int:
    """Seed Python's `random`, NumPy (if imported) and torch, and leave the seed where
    `setup_dataloaders` (and Lightning) read it for the DistributedSampler; return it. Without a
    seed: the one left by an earlier call, else 0. `verbose` logs it at INFO to the "nbfabric" logger.

    DataLoader workers get distinct seeds derived from it by torch itself; `workers` is recorded
    for Lightning's code (PL_SEED_WORKERS) and changes nothing here.
    """
    seed = int(os.environ.get(SEED_VARIABLE, 0)) if seed is None else int(seed)
    os.environ[SEED_VARIABLE] = str(seed)
    os.environ["PL_SEED_WORKERS"] = str(int(bool(workers)))
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if verbose:
        _log.info("Seed set to %d", seed)
    return seed
