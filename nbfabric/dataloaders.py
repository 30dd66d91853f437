"""Rebuild a DataLoader so that each rank reads its own shard of the dataset."""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

_LOADER_OPTIONS = (
    "batch_size",
    "drop_last",
    "num_workers",
    "collate_fn",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "generator",
    "persistent_workers",
    "pin_memory_device",
)


class ShardedSampler(Sampler[int]):
    """Every `num_replicas`-th index drawn from another sampler, starting at `rank`.

    For samplers other than sequential and random; the wrapped sampler must yield the same
    order on every rank (seed it).
    """

    def __init__(self, sampler: Sampler, num_replicas: int, rank: int):
        self.sampler = sampler
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self) -> Iterator[int]:
        for position, index in enumerate(self.sampler):
            if position % self.num_replicas == self.rank:
                yield index

    def __len__(self) -> int:
        return (len(self.sampler) - self.rank + self.num_replicas - 1) // self.num_replicas


def shard(loader: DataLoader, num_replicas: int, rank: int) -> DataLoader:
    """A loader like `loader` over this rank's shard (unchanged if it is already distributed)."""
    if isinstance(loader.dataset, IterableDataset) or isinstance(loader.sampler, DistributedSampler):
        return loader
    if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
        raise TypeError(
            f"setup_dataloaders cannot shard a DataLoader with a custom batch_sampler "
            f"({type(loader.batch_sampler).__name__}); shard it yourself and pass use_distributed_sampler=False."
        )
    sampler = loader.sampler
    if isinstance(sampler, (SequentialSampler, RandomSampler)):
        sampler = DistributedSampler(
            loader.dataset, num_replicas=num_replicas, rank=rank, shuffle=isinstance(sampler, RandomSampler)
        )
    else:
        sampler = ShardedSampler(sampler, num_replicas, rank)
    options = {name: getattr(loader, name) for name in _LOADER_OPTIONS}
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, sampler=sampler, **options)
