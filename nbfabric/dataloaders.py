"""A DataLoader made to read this rank's shard of its dataset, as Lightning Fabric shards it: the
same class and attributes (a copy), its sampler replaced by a DistributedSampler seeded with the
run's seed (`seed_everything`), a custom sampler's indices split the same way."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Iterator

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler, SequentialSampler

from nbfabric.tracebacks import users_stacklevel

SEED_VARIABLE = "PL_GLOBAL_SEED"  # where seed_everything leaves the seed, as Lightning does


class ShardedSampler(DistributedSampler):
    """This rank's share of another sampler's indices (which must be the same on every rank): the
    list padded to a multiple of the ranks, then every `num_replicas`-th entry from `rank`."""

    def __init__(self, sampler: Sampler, num_replicas: int, rank: int, seed: int = 0):
        super().__init__(range(len(sampler)), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        self.wrapped = sampler

    def __iter__(self) -> Iterator[Any]:
        indices = list(self.wrapped)
        return (indices[position] for position in super().__iter__())

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.wrapped, "set_epoch"):
            self.wrapped.set_epoch(epoch)


class ShardedBatches(Sampler[list]):
    """Every `num_replicas`-th batch of a batch sampler that takes no other sampler, from `rank`."""

    def __init__(self, batch_sampler: Any, num_replicas: int, rank: int):
        self.batch_sampler, self.num_replicas, self.rank = batch_sampler, num_replicas, rank

    def __iter__(self) -> Iterator[list]:
        for position, batch in enumerate(self.batch_sampler):
            if position % self.num_replicas == self.rank:
                yield batch

    def __len__(self) -> int:
        return (len(self.batch_sampler) - self.rank + self.num_replicas - 1) // self.num_replicas


def shard(loader: DataLoader, num_replicas: int, rank: int) -> DataLoader:
    """A copy of `loader` that reads this rank's shard (`loader` itself if it is already distributed)."""
    if isinstance(loader.dataset, IterableDataset) or isinstance(loader.sampler, DistributedSampler):
        return loader
    seed = int(os.environ.get(SEED_VARIABLE, 0))
    sampler = _distributed(loader.sampler, loader.dataset, num_replicas, rank, seed)
    batch_sampler = loader.batch_sampler
    batch_size = loader.batch_size
    if type(batch_sampler) is BatchSampler and loader.batch_size is None:  # given as batch_sampler=
        warnings.warn(
            f"setup_dataloaders: the loader's batch_sampler (torch's BatchSampler, {batch_sampler.batch_size} per batch) is "
            "replaced, as Lightning Fabric replaces it: the loader's sampler split across ranks, one sample per batch. "
            "Give the DataLoader batch_size= (and shuffle= or sampler=) instead.",
            stacklevel=users_stacklevel(),
        )
        batch_sampler, batch_size = BatchSampler(sampler, 1, False), 1
    elif type(batch_sampler) is BatchSampler:
        batch_sampler = BatchSampler(sampler, batch_sampler.batch_size, batch_sampler.drop_last)
    elif batch_sampler is not None and isinstance(getattr(batch_sampler, "sampler", None), Sampler):
        batch_sampler = copy.copy(batch_sampler)  # a custom one that draws from a sampler: shard that
        batch_sampler.sampler = _distributed(batch_sampler.sampler, loader.dataset, num_replicas, rank, seed)
    elif batch_sampler is not None:
        batch_sampler = ShardedBatches(batch_sampler, num_replicas, rank)
    sharded = copy.copy(loader)
    for name, value in (("sampler", sampler), ("batch_sampler", batch_sampler), ("batch_size", batch_size), ("_iterator", None)):
        object.__setattr__(sharded, name, value)  # DataLoader refuses to change these after __init__
    return sharded


def _distributed(sampler: Sampler, dataset: Any, num_replicas: int, rank: int, seed: int) -> DistributedSampler:
    if isinstance(sampler, (SequentialSampler, RandomSampler)):
        return DistributedSampler(dataset, num_replicas, rank, shuffle=isinstance(sampler, RandomSampler), seed=seed)
    return ShardedSampler(sampler, num_replicas, rank, seed)
