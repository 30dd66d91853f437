"""A DataLoader made to read this rank's shard of its dataset, as Lightning Fabric shards it: the
same class and attributes (a copy), its sampler replaced by a DistributedSampler seeded with the
run's seed (`seed_everything`), a custom sampler's indices split the same way, a custom batch
sampler made again over the rank's sampler."""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from contextlib import contextmanager
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
    elif batch_sampler is not None:
        batch_sampler = _made_again(batch_sampler, sampler)
        sampler = loader.sampler  # the loader's own (a DataLoader given a batch_sampler has a sequential one), as in Lightning
    sharded = copy.copy(loader)
    for name, value in (("sampler", sampler), ("batch_sampler", batch_sampler), ("batch_size", batch_size), ("_iterator", None)):
        object.__setattr__(sharded, name, value)  # DataLoader refuses to change these after __init__
    return sharded


_OWN_SPLIT = "or pass use_distributed_sampler=False and split the batches across ranks yourself"


def _made_again(batch_sampler: Any, sampler: Sampler) -> Any:
    """A custom batch sampler made again over this rank's `sampler`, as Lightning makes it: one
    made in the ranks' code with the arguments it was made with, `sampler` replaced; another one
    as torch's BatchSampler is made. A TypeError where it cannot be: its batches are not split."""
    cls = type(batch_sampler)
    if _INIT_ARGS in vars(batch_sampler):
        args, kwargs = vars(batch_sampler)[_INIT_ARGS]
        signature = inspect.signature(cls.__init__)  # not cls's: BatchSampler.__new__ takes any arguments
        if "sampler" not in signature.parameters:
            raise TypeError(
                f"setup_dataloaders cannot give this rank's sampler to the batch sampler {cls.__qualname__}, whose "
                f"__init__ takes no argument named `sampler`; name it so, {_OWN_SPLIT}"
            )
        bound = signature.bind(batch_sampler, *args, **kwargs)  # it was made with these
        bound.arguments["sampler"] = sampler
        return cls(*bound.args[1:], **bound.kwargs)
    made_as = f"{cls.__qualname__}(sampler, batch_size=..., drop_last=...)"
    if not (hasattr(batch_sampler, "batch_size") and hasattr(batch_sampler, "drop_last")):
        raise TypeError(
            f"setup_dataloaders cannot make the batch sampler {cls.__qualname__} again over this rank's sampler as "
            f"{made_as}: it has no batch_size and drop_last; follow the arguments of torch's BatchSampler, {_OWN_SPLIT}"
        )
    try:
        return cls(sampler, batch_size=batch_sampler.batch_size, drop_last=batch_sampler.drop_last)
    except TypeError as error:
        if "argument" not in str(error):  # not a mismatch of arguments: the sampler's own error
            raise
        raise TypeError(
            f"setup_dataloaders cannot make the batch sampler {cls.__qualname__} again over this rank's sampler as "
            f"{made_as} ({error}); follow the arguments of torch's BatchSampler, {_OWN_SPLIT}"
        ) from error


_INIT_ARGS = "_nbfabric_init_args"
_recording = False


def _recording_new(cls: type, *args: Any, **kwargs: Any) -> Any:
    made = object.__new__(cls)
    if _recording and hasattr(made, "__dict__"):
        made.__dict__[_INIT_ARGS] = (args, kwargs)
    return made


@contextmanager
def batch_samplers_recorded() -> Iterator[None]:
    """While a rank runs the user's code, each torch BatchSampler (of a subclass) made keeps the
    arguments it was made with, so that setup_dataloaders can make it again over the rank's sampler,
    as Lightning does. (BatchSampler.__new__ stays once set: deleting it would break the class.)"""
    global _recording
    if vars(BatchSampler).get("__new__") is None:
        BatchSampler.__new__ = _recording_new
    before, _recording = _recording, True
    try:
        yield
    finally:
        _recording = before


def _distributed(sampler: Sampler, dataset: Any, num_replicas: int, rank: int, seed: int) -> DistributedSampler:
    if isinstance(sampler, (SequentialSampler, RandomSampler)):
        return DistributedSampler(dataset, num_replicas, rank, shuffle=isinstance(sampler, RandomSampler), seed=seed)
    return ShardedSampler(sampler, num_replicas, rank, seed)
