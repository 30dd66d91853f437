"""What a rank that outlives its runs (a rank pool's) keeps between them: per settings, the
strategy, the precision and the modules set up, and how those modules go on in the next run
after a stop (a fresh state for the strategy's wrapper) or in a new process group."""

from __future__ import annotations

import gc
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from nbfabric.config import RunConfig


@dataclass
class Resident:
    """One setting's kept strategy and precision, the modules and optimizers set up with them (in
    the order they were set up, the same on every rank), and the process group they last ran in."""

    strategy: Any
    precision: Any
    modules: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary)  # setup number -> module, in setup order
    optimizers: weakref.WeakValueDictionary = field(default_factory=weakref.WeakValueDictionary)  # setup number -> optimizer, in setup order
    group: Any = None

    def add(self, module: Any, optimizers: Any = ()) -> None:
        """Keep `module` and its optimizers for the runs to come (while they are in use)."""
        self.modules[next(_setup_order)] = module
        for optimizer in optimizers:
            self.optimizers[next(_setup_order)] = optimizer

    def resume(self, *, after_stop: bool) -> None:
        """In the next run, after joining its process group: each module set up before goes on in
        this group, with a fresh wrapper state after a stop; one that cannot is marked, and says
        why when it is next used. After a stop, which may have cut one rank's optimizer step short
        and not another's, the replicas take rank 0's state again (`strategy.resync`)."""
        group = _world_group()
        new_group = self.group is not None and group is not self.group
        self.group = group
        if not (new_group or after_stop):
            return
        if after_stop:
            gc.collect()  # every rank then holds the same modules: those its code still uses
        modules = list(self.modules.values())
        for module in modules:
            reason = self.strategy.resume_module(module._forward_module, new_group=new_group, after_stop=after_stop)
            if reason:
                module.mark_unusable(reason)
        if after_stop:
            self.strategy.resync([m._forward_module for m in modules if not m._unusable], list(self.optimizers.values()))


_setup_order = itertools.count()


_kept: dict[RunConfig, Resident] = {}  # per process: a pool rank's kept runs, by their settings


def resident(config: RunConfig, strategy: Any, precision: Any) -> Resident | None:
    """The run kept for these settings (made from this run's strategy and precision the first time);
    None for settings that cannot be a key (a strategy instance), which then start afresh."""
    try:
        return _kept.setdefault(config, Resident(strategy, precision))
    except TypeError:
        return None


def resume_all(*, after_stop: bool) -> None:
    """In a run on a rank that outlives its runs, once it joined its process group: every kept
    run's modules go on in it (see `Resident.resume`), whichever settings set them up."""
    for kept in _kept.values():
        kept.resume(after_stop=after_stop)


def kept_modules() -> list[Any]:
    """Every module set up in an earlier run on this rank (with any settings) and still in use."""
    return [module for kept in _kept.values() for module in kept.modules.values()]


def _world_group() -> Any:
    return torch.distributed.group.WORLD if torch.distributed.is_available() and torch.distributed.is_initialized() else None
