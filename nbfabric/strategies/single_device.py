"""One process, one device: collectives are identities."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager

import torch

from nbfabric import checkpoint
from nbfabric.config import RunConfig
from nbfabric.launcher.environment import RankInfo
from nbfabric.precision import Precision


class SingleDeviceStrategy:
    """Runs everything on one device in this process: for a rank, the device of its local rank. It is
    also the interface every strategy implements (DDP, FSDP and DeepSpeed subclass it); Fabric calls
    nothing else of a strategy.

    Made by the user (``Fabric(strategy=DDPStrategy(...))``) or by Fabric from the settings; `bind`
    gives it the run's accelerator and devices."""

    name = "single_device"

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.device_ids: tuple[int, ...] = (0,)
        self.precision = "32-true"
        self.num_nodes = 1
        self._ranks = RankInfo()  # this process's place, once it joined a run

    def bind(self, config: RunConfig) -> SingleDeviceStrategy:
        """Take the resolved settings of the run (accelerator, devices, precision)."""
        self.device = torch.device(config.accelerator)
        self.device_ids = config.device_ids
        self.precision = config.precision
        self.num_nodes = config.num_nodes
        if self._ranks == RankInfo():  # not in a run yet: its size to be, as the Fabric's (Lightning's say so)
            self._ranks = RankInfo(world_size=config.world_size)
        return self

    def make_precision(self) -> Precision:
        """What the precision setting does to this strategy's modules, forward, backward and steps."""
        return Precision(self.precision, self.device.type)

    @property
    def root_device(self) -> torch.device:
        """The device of this rank (Lightning's name)."""
        return self.device

    # This process's place in the run, under Lightning's names (its defaults until it joined one).
    @property
    def global_rank(self) -> int:
        return self._ranks.global_rank

    @property
    def local_rank(self) -> int:
        return self._ranks.local_rank

    @property
    def node_rank(self) -> int:
        return self._ranks.node_rank

    @property
    def world_size(self) -> int:
        return self._ranks.world_size

    @property
    def is_global_zero(self) -> bool:
        return self._ranks.global_rank == 0

    @property
    def num_processes(self) -> int:
        """Ranks on each node."""
        return len(self.device_ids)

    @property
    def parallel_devices(self) -> list[torch.device]:
        """The devices of this node's ranks."""
        if self.device.type == "cuda":
            return [torch.device("cuda", index) for index in self.device_ids]
        return [torch.device(self.device.type)] * len(self.device_ids)

    def preload(self) -> None:
        """Import, in the launching process, what each forked rank would otherwise import itself."""

    def setup_environment(self, ranks: RankInfo) -> None:
        """In the rank: take its device (a GPU by its local rank), and join the run."""
        self._ranks = ranks
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.device_ids[ranks.local_rank % len(self.device_ids)])
            torch.cuda.set_device(self.device)

    def release(self) -> None:
        """Undo what `setup_environment` set up in this process, if it must not outlive the run."""

    def leave(self) -> None:
        """At the end of a script's rank: undo all that `setup_environment` set up."""

    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module as this strategy runs it (here: itself; DDP, FSDP and DeepSpeed wrap or shard it)."""
        return module

    def resume_module(self, module: torch.nn.Module, *, new_group: bool, after_stop: bool) -> str:
        """On a rank that outlives its runs, in a later run: make `module` (what `setup_module` gave)
        go on in this run's process group (`new_group`: not the one it was set up in) after a
        stopped or failed run (`after_stop`); '' when it can, else why it cannot."""
        return ""

    def resync(self, modules: list[torch.nn.Module], optimizers: list[Any]) -> None:
        """On a rank that outlives its runs, after a stopped or failed run: make the state that
        every rank holds a copy of (replicas) equal on every rank again. Here: nothing is replicated."""

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer as this strategy steps it."""
        return optimizer

    def setup_module_and_optimizers(self, module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[torch.nn.Module, list[Any]]:
        """`fabric.setup(model, *optimizers)`: the module's wrapper and the optimizers to step."""
        return self.setup_module(module), [self.setup_optimizer(optimizer) for optimizer in optimizers]

    def backward(self, tensor: torch.Tensor, precision: Precision, *args: Any, module: torch.nn.Module | None = None, **kwargs: Any) -> None:
        """Backward through `tensor` under `precision` (`module`: the strategy's module the loss came from)."""
        precision.backward(tensor, *args, **kwargs)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, precision: Precision, **kwargs: Any) -> Any:
        """Step `optimizer` under `precision`; its return value."""
        return precision.optimizer_step(optimizer, **kwargs)

    def check_clip_gradients(self) -> None:
        """Raise where `fabric.clip_gradients` cannot reach the gradients."""

    def no_backward_sync(self, module: torch.nn.Module) -> ContextManager:
        """A context in which backward does not synchronise `module`'s gradients across ranks."""
        return nullcontext()

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        """Wait for every rank (Lightning's `name` argument is taken and unused)."""
        pass

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002 - Lightning's name
        """Every rank's `decision` together: True if all (`all`) or any of them is True."""
        return decision

    def save(self, path: Any, state: dict[str, Any], is_global_zero: bool, filter: dict[str, Any] | None = None) -> None:
        """Rank 0 writes the state atomically; every rank waits for it. Every rank turns the state
        into what is written, as Lightning's do: a state that cannot be saved fails on every rank."""
        converted = checkpoint.filtered(checkpoint.to_state(state), filter)
        if is_global_zero:
            checkpoint.atomic_save(converted, path)
        self.barrier()

    def load(self, path: Any, state: dict[str, Any] | None, *, strict: bool, weights_only: bool | None) -> dict[str, Any]:
        """Restore the objects in `state` in place from `path`; the rest of the checkpoint."""
        return checkpoint.load_into(path, state, strict=strict, weights_only=weights_only)

    def load_raw(self, target: Any, state: dict[str, Any], *, strict: bool) -> None:
        """A plain state dict (what torch.save wrote of a `state_dict()`) into a module or optimizer."""
        if isinstance(target, torch.nn.Module):
            checkpoint.load_module(target, state, strict=strict)
        else:
            target.load_state_dict(state)

    def before_return(self) -> None:
        """On every rank, after the run's function succeeded: make what was sharded whole (may be a collective)."""

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank."""
        return obj

    def all_gather(self, tensor: torch.Tensor, group: Any = None, sync_grads: bool = False) -> torch.Tensor:
        """Every rank's `tensor`, stacked along a new first dimension."""
        return tensor

    def all_reduce(self, tensor: torch.Tensor, group: Any = None, reduce_op: Any = "mean") -> torch.Tensor:
        """`tensor` reduced over the ranks by `reduce_op` (Lightning's order of arguments), in place."""
        return tensor
