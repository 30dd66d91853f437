"""One process, one device: collectives are identities."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager

import torch

from nbfabric import checkpoint
from nbfabric.config import RunConfig
from nbfabric.launcher.environment import RankInfo


class SingleDeviceStrategy:
    """Runs everything on one device in this process: for a rank, the device of its local rank.

    Made by the user (``Fabric(strategy=DDPStrategy(...))``) or by Fabric from the settings; `bind`
    gives it the run's accelerator and devices."""

    name = "single_device"

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.device_ids: tuple[int, ...] = (0,)

    def bind(self, config: RunConfig) -> SingleDeviceStrategy:
        """Take the resolved settings of the run (accelerator, devices, precision)."""
        self.device = torch.device(config.accelerator)
        self.device_ids = config.device_ids
        return self

    @property
    def root_device(self) -> torch.device:
        """The device of this rank (Lightning's name)."""
        return self.device

    def preload(self) -> None:
        """Import, in the launching process, what each forked rank would otherwise import itself."""

    def setup_environment(self, ranks: RankInfo) -> None:
        """In the rank: take its device (a GPU by its local rank), and join the run."""
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.device_ids[ranks.local_rank % len(self.device_ids)])
            torch.cuda.set_device(self.device)

    def release(self) -> None:
        """Undo what `setup_environment` set up in this process, if it must not outlive the run."""

    def leave(self) -> None:
        """At the end of a script's rank: undo all that `setup_environment` set up."""

    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def no_backward_sync(self, module: torch.nn.Module) -> ContextManager:
        return nullcontext()

    def barrier(self) -> None:
        pass

    def save(self, path: Any, state: dict[str, Any], is_global_zero: bool, filter: dict[str, Any] | None = None) -> None:
        """Rank 0 writes the state atomically; every rank waits for it."""
        if is_global_zero:
            checkpoint.atomic_save(checkpoint.filtered(checkpoint.to_state(state), filter), path)
        self.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather(self, tensor: torch.Tensor, group: Any = None, sync_grads: bool = False) -> torch.Tensor:
        return tensor

    def all_reduce(self, tensor: torch.Tensor, op: str, group: Any = None) -> torch.Tensor:
        return tensor
