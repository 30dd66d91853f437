"""Seed every random number generator a training run uses, as Lightning's seed_everything does,
and DataLoader workers from the seed, their rank and their index."""

from __future__ import annotations

import logging
import os
import random
import sys
import warnings
from functools import partial
from typing import Any

import torch

from nbfabric.dataloaders import SEED_VARIABLE
from nbfabric.tracebacks import users_stacklevel

WORKERS_VARIABLE = "PL_SEED_WORKERS"  # whether loaders set up after seed_everything seed their workers
SEED_RANGE = (0, 2**32 - 1)  # what numpy accepts
_log = logging.getLogger("nbfabric")
_MASK64 = (1 << 64) - 1


def seed_everything(seed: int | None = None, workers: bool = False, verbose: bool = True) -> int:
    """Seed Python's `random`, NumPy (if imported) and torch, and leave the seed where
    `setup_dataloaders` (and Lightning) read it for the DistributedSampler; return it. Without a
    seed: the one left by an earlier call, else 0 (with a warning). `verbose` logs it at INFO to
    the "nbfabric" logger. `workers=True`: loaders set up afterwards give each worker of each rank
    its own seed (see `worker_init`).

    Raises:
        ValueError: a seed outside 0 to 2**32 - 1.
    """
    if seed is None:
        given = os.environ.get(SEED_VARIABLE)
        if given is None:
            seed = 0
            if verbose:
                warnings.warn(f"No seed found, seed set to {seed}", stacklevel=users_stacklevel())
        else:
            try:
                seed = int(given)
            except ValueError:
                raise ValueError(f"Invalid seed specified via {SEED_VARIABLE}: {given!r}") from None
    seed = int(seed)
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"{seed} is not in bounds, numpy accepts from {SEED_RANGE[0]} to {SEED_RANGE[1]}")
    os.environ[SEED_VARIABLE] = str(seed)
    os.environ[WORKERS_VARIABLE] = str(int(bool(workers)))
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed)
    torch.manual_seed(seed)
    if verbose:
        _log.info("Seed set to %d", seed)
    return seed


def seed_workers(loader: Any, rank: int) -> None:
    """After `seed_everything(workers=True)`, give a loader without a worker_init_fn one that seeds
    each worker from its rank and index."""
    if int(os.environ.get(WORKERS_VARIABLE, 0)) and getattr(loader, "worker_init_fn", False) is None:
        loader.worker_init_fn = partial(worker_init, rank=rank)


def worker_init(worker_id: int, rank: int) -> None:
    """In a DataLoader worker: seed torch, `random` and NumPy from the loader's base seed, the worker
    index and the rank, with the same numbers as Lightning's `pl_worker_init_function`."""
    base_seed = torch.initial_seed() - worker_id
    seeds = _seed_sequence(base_seed, worker_id, rank, count=4)
    torch.manual_seed(seeds[0])
    random.seed((seeds[1] << 32) | seeds[2])
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(numpy.random.SeedSequence([base_seed, worker_id, rank]).generate_state(4))


def _seed_sequence(base_seed: int, worker_id: int, rank: int, count: int) -> list[int]:
    """`count` 64-bit seeds: the three numbers mixed by MurmurHash3's 64-bit finaliser, then a
    linear congruential generator (Knuth's MMIX constants)."""
    state = (base_seed << 32) | (worker_id << 16) | rank
    for multiplier in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        state ^= state >> 33
        state = (state * multiplier) & _MASK64
    state ^= state >> 33
    seeds = []
    for _ in range(count):
        state = (state * 6364136223846793005 + 1) & _MASK64
        seeds.append(state)
    return seeds
