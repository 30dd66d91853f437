"""One process, one device: collectives are identities."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager

import torch

from nbfabric import checkpoint


class SingleDeviceStrategy:
    """Runs everything on `device` in this process."""

    name = "single_device"

    def __init__(self, device: torch.device):
        self.device = device

    def preload(self) -> None:
        """Import, in the launching process, what each forked rank would otherwise import itself."""

    def setup_environment(self, rank: int, world_size: int) -> None:
        if self.device.type == "cuda":
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

    def save(self, path: Any, state: dict[str, Any], is_global_zero: bool) -> None:
        """Rank 0 writes the state atomically; every rank waits for it."""
        if is_global_zero:
            checkpoint.atomic_save(checkpoint.to_state(state), path)
        self.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        return tensor
