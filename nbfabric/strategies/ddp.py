"""Distributed data parallel: one replica per rank, gradients averaged during backward."""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from nbfabric.launcher.environment import RankInfo, preserved_environment
from nbfabric.strategies.single_device import SingleDeviceStrategy

REDUCE_OPS = ("mean", "sum", "min", "max", "product")
_TORCH_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "product": dist.ReduceOp.PRODUCT}


class DDPStrategy(SingleDeviceStrategy):
    """Wraps modules in DistributedDataParallel; collectives go through torch.distributed."""

    name = "ddp"

    def __init__(self, accelerator: str, device_ids: tuple[int, ...] = (0,)):
        super().__init__(accelerator, device_ids)
        self.backend = "nccl" if accelerator == "cuda" else "gloo"
        self._private_group = False
        self._listener: socket.socket | None = None  # global rank 0's listening socket, on several nodes

    def preload(self) -> None:
        """DistributedDataParallel imports torch._dynamo when first built (about 2 s): do it once, here."""
        if "torch._dynamo" in sys.modules:
            return
        with preserved_environment():
            import torch._dynamo  # noqa: F401

    def setup_environment(self, ranks: RankInfo) -> None:
        """Join the process group: through the launcher's store, torchrun's env://, or, for a single
        process of its own, an in-memory store."""
        super().setup_environment(ranks)
        if dist.is_initialized():
            return
        rank, world_size = ranks.global_rank, ranks.world_size
        store = ranks.links.store if ranks.links is not None else None
        if store is None and ranks.links is not None and world_size > 1:
            store = self._node_zero_store(rank, world_size)  # ranks nbfabric started on several nodes
        if store is not None:
            dist.init_process_group(self.backend, store=store, rank=rank, world_size=world_size)
        elif world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(self.backend, store=dist.HashStore(), rank=0, world_size=1)
            self._private_group = True
        else:
            dist.init_process_group(self.backend, init_method="env://", rank=rank, world_size=world_size)

    def _node_zero_store(self, rank: int, world_size: int) -> dist.TCPStore:
        """The run's store at MASTER_ADDR:MASTER_PORT, which global rank 0 serves. It listens on
        that address only where the address is this machine's (torch's own listens on all)."""
        address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        timeout = timedelta(minutes=30)
        if rank != 0:
            return dist.TCPStore(address, port, world_size, False, timeout)
        try:
            family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
            self._listener = socket.create_server((address, port), family=family)
        except OSError:  # not an address of this machine: listen as torch does
            return dist.TCPStore(address, port, world_size, True, timeout, wait_for_workers=False)
        return dist.TCPStore(address, port, world_size, True, timeout, wait_for_workers=False, master_listen_fd=self._listener.fileno())

    def release(self) -> None:
        """End the single-process group this strategy made, so the process can fork ranks again."""
        if self._private_group and dist.is_initialized():
            dist.destroy_process_group()
        self._private_group = False

    def leave(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def no_backward_sync(self, module: torch.nn.Module) -> ContextManager:
        return module.no_sync()

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor)
        return torch.stack(gathered)

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        result = tensor.clone()
        if op == "mean":
            if not result.is_floating_point():
                result = result.float()
            dist.all_reduce(result, op=dist.ReduceOp.SUM)
            return result / dist.get_world_size()
        dist.all_reduce(result, op=_TORCH_OPS[op])
        return result
