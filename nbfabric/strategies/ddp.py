"""Distributed data parallel: one replica per rank, gradients averaged during backward."""

from __future__ import annotations

import inspect
import os
import sys
import time
from datetime import timedelta
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch.distributed.utils import _sync_module_states
from torch.nn.parallel import DistributedDataParallel

from nbfabric.config import RunConfig
from nbfabric.launcher.environment import RankInfo, preserved_environment
from nbfabric.launcher.keyed_store import KeyedStore, KeyedStoreServer, join_run_store, keyed_rendezvous_wanted
from nbfabric.strategies.single_device import SingleDeviceStrategy
from nbfabric.wrappers import unwrap

REDUCE_OPS = ("mean", "avg", "sum", "min", "max", "product", "band", "bor", "bxor")  # any case, or torch.distributed.ReduceOp
_DDP_OPTIONS = tuple(
    name for name in inspect.signature(DistributedDataParallel.__init__).parameters
    if name not in ("self", "module", "device_ids", "output_device", "process_group", "kwargs", "args")
)
RESYNC_BUCKET_BYTES = 250 * 1024 * 1024  # as DDP's own broadcast of the module at setup
GLOO_WORKER_NAME = "pt_gloo_runloop"  # the name torch gives the threads that run gloo's collectives
_TORCH_OPS = {
    "sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "product": dist.ReduceOp.PRODUCT,
    "band": dist.ReduceOp.BAND, "bor": dist.ReduceOp.BOR, "bxor": dist.ReduceOp.BXOR,
}


def reduce_op_name(op: Any) -> str:
    """`reduce_op` as one of REDUCE_OPS ("avg" is "mean"); ValueError naming the choices otherwise."""
    if isinstance(op, str) and op.lower() in REDUCE_OPS:
        return "mean" if op.lower() == "avg" else op.lower()
    if op == dist.ReduceOp.AVG:
        return "mean"
    for name, torch_op in _TORCH_OPS.items():
        if op == torch_op:
            return name
    raise ValueError(f"reduce_op={op!r} is not valid; choose one of {', '.join(REDUCE_OPS)} or a torch.distributed.ReduceOp of them")


def destroy_world_group() -> None:
    """End this process's default group, through DeepSpeed where DeepSpeed joined it: DeepSpeed then
    forgets the groups it made from it (a clone of the world, ZeRO's), which a later group here, or
    in a rank forked from here, would otherwise meet as "not registered"."""
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def let_gloo_workers_finish(limit: float = 2.0) -> None:
    """Yield the CPU and the GIL until no gloo worker thread of this process is running (at most
    `limit` seconds). A worker releases a collective's tensors after the caller already has its
    result, and that release takes the GIL: if it comes once the interpreter has begun to shut down,
    the process aborts ("terminate called without an active exception"). A rank pinned to one core,
    as mpiexec pins them, meets this often, since the caller runs on before the worker."""
    deadline = time.monotonic() + limit
    idle_looks = 0
    while idle_looks < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
        idle_looks = 0 if _thread_running(GLOO_WORKER_NAME) else idle_looks + 1


def _thread_running(name: str) -> bool:
    """Whether a thread of this process called `name` is running or runnable (Linux's /proc;
    elsewhere none is seen, and the caller's sleeps alone give the workers their turn)."""
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return False
    for thread in threads:
        try:
            with open(f"/proc/self/task/{thread}/stat") as file:
                stat = file.read()
        except OSError:  # it ended
            continue
        thread_name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:][:1]
        if thread_name == name and state == "R":
            return True
    return False


class DDPStrategy(SingleDeviceStrategy):
    """Wraps modules in DistributedDataParallel; collectives go through torch.distributed.

    ``DDPStrategy(find_unused_parameters=True, static_graph=..., timeout=timedelta(...),
    process_group_backend="gloo")``: DistributedDataParallel's own options, the process group's
    timeout and backend (by default NCCL on CUDA, gloo elsewhere), as Lightning's DDPStrategy takes them.
    """

    name = "ddp"

    def __init__(self, *, process_group_backend: str | None = None, timeout: timedelta | float | None = None, **ddp_options: Any):
        super().__init__()
        unknown = sorted(set(ddp_options) - set(_DDP_OPTIONS))
        if unknown:
            raise TypeError(
                f"DDPStrategy got {', '.join(unknown)}; it takes process_group_backend, timeout and "
                f"DistributedDataParallel's options: {', '.join(_DDP_OPTIONS)}"
            )
        self.ddp_options = ddp_options
        self.timeout = timedelta(seconds=timeout) if isinstance(timeout, (int, float)) else timeout
        self._asked_backend = process_group_backend
        self.backend = process_group_backend or "gloo"
        self._private_group = False
        self._store_server: KeyedStoreServer | None = None  # global rank 0's, on several nodes

    @property
    def process_group_backend(self) -> str:
        """The process group's backend: the one asked for, else nccl on GPUs and gloo elsewhere."""
        return self.backend

    def bind(self, config: RunConfig) -> DDPStrategy:
        super().bind(config)
        self.backend = self._asked_backend or ("nccl" if config.accelerator == "cuda" else "gloo")
        if config.strategy == "ddp_find_unused_parameters_true":
            self.ddp_options.setdefault("find_unused_parameters", True)
        return self

    def preload(self) -> None:
        """DistributedDataParallel imports torch._dynamo when first built (about 2 s): do it once, here.
        init_process_group empties torch._dynamo's rule caches (thousands of entries filled at its
        import), which costs each forked rank about a millisecond of copying the pages it frees:
        empty them here, where it happens once."""
        if "torch._dynamo" not in sys.modules:
            with preserved_environment():
                import torch._dynamo  # noqa: F401
        rules = getattr(sys.modules["torch._dynamo"], "trace_rules", None)
        filled = getattr(rules, "get_torch_obj_rule_map", None)
        if hasattr(rules, "clear_lru_cache") and filled is not None and filled.cache_info().currsize:
            rules.clear_lru_cache()

    def setup_environment(self, ranks: RankInfo) -> None:
        """Join the process group: through the launcher's store (one machine), the run's keyed store
        (ranks nbfabric started on several nodes, and any rank whose environment holds the run's key,
        `keyed_store.RUN_KEY_ENV`), torchrun's env://, or, for a single process of its own, an
        in-memory store."""
        super().setup_environment(ranks)
        if dist.is_initialized():
            return
        rank, world_size = ranks.global_rank, ranks.world_size
        store = ranks.links.store if ranks.links is not None else None
        if store is None and world_size > 1 and (ranks.links is not None or keyed_rendezvous_wanted()):
            store = self._node_zero_store(rank, world_size)
        if store is not None:
            dist.init_process_group(self.backend, store=store, rank=rank, world_size=world_size, timeout=self.timeout)
        elif world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(self.backend, store=dist.HashStore(), rank=0, world_size=1)
            self._private_group = True
        else:
            dist.init_process_group(self.backend, init_method="env://", rank=rank, world_size=world_size, timeout=self.timeout)

    def _node_zero_store(self, rank: int, world_size: int) -> KeyedStore:
        """The run's store at MASTER_ADDR:MASTER_PORT, which global rank 0 serves on that address
        only; it admits only processes that know the run's key, every rank's RUN_KEY_ENV."""
        if self._store_server is not None:  # the store of a group this rank left (a pool's, after a stop)
            self._store_server.close()
        store, self._store_server = join_run_store(rank, world_size, self.timeout or timedelta(minutes=30))
        return store

    def release(self) -> None:
        """End the single-process group this strategy made, so the process can fork ranks again."""
        if self._private_group and dist.is_initialized():
            destroy_world_group()
        self._private_group = False

    def leave(self) -> None:
        """Leave the process group (and stop serving its store, on global rank 0 of several nodes),
        once gloo's workers have let go of the last collective (see `let_gloo_workers_finish`)."""
        if dist.is_initialized():
            destroy_world_group()
        let_gloo_workers_finish()  # also when the script destroyed the group itself
        if self._store_server is not None:
            self._store_server.close()
            self._store_server = None

    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, **self.ddp_options)

    def resume_module(self, module: torch.nn.Module, *, new_group: bool, after_stop: bool) -> str:
        """DDP's wrapper moves to this run's group, its gradient reducer reset (a stop between forward
        and backward leaves it expecting a backward); no collective, so every rank can do it alone."""
        if isinstance(module, DistributedDataParallel):
            module._update_process_group(dist.group.WORLD)
        return ""

    def resync(self, modules: list[torch.nn.Module], optimizers: list[Any]) -> None:
        """Each replica takes rank 0's parameters, buffers and optimizer state: a stop can land in
        the middle of an optimizer step (which updates one parameter after another) on one rank and
        not on another, and DDP alone would go on with the copies apart. Collectives, made in the
        order of setup on every rank."""
        for module in modules:
            inner = module.module if isinstance(module, DistributedDataParallel) else module
            _sync_module_states(inner, dist.group.WORLD, RESYNC_BUCKET_BYTES, src=0, params_and_buffers_to_ignore=())
        for optimizer in optimizers:
            inner = unwrap(optimizer)
            state = [inner.state_dict() if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(state, src=0)
            if dist.get_rank() != 0:
                inner.load_state_dict(state[0])

    def no_backward_sync(self, module: torch.nn.Module) -> ContextManager:
        return module.no_sync()

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        """Wait for every rank (Lightning's `name` argument is taken and unused); outside a process
        group, as in the process that launched the ranks, there is none to wait for, as in Lightning."""
        if not dist.is_initialized():
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002 - Lightning's name
        if not dist.is_initialized():
            return decision
        votes = torch.tensor(int(decision), device=self.root_device)
        dist.all_reduce(votes, op=dist.ReduceOp.SUM)
        return bool(votes == dist.get_world_size()) if all else bool(votes)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def all_gather(self, tensor: torch.Tensor, group: Any = None, sync_grads: bool = False) -> torch.Tensor:
        """Every rank's `tensor` of `group`, stacked; with `sync_grads`, gradients flow back to each
        rank's input. Outside a process group, `tensor` as it is (as Lightning's)."""
        if not dist.is_initialized():
            return tensor
        tensor = tensor.contiguous()
        group = group if group is not None else dist.group.WORLD
        if sync_grads:
            from torch.distributed.nn.functional import all_gather

            return torch.stack(all_gather(tensor, group))
        with torch.no_grad():
            gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, tensor, group)
            return torch.stack(gathered)

    def all_reduce(self, tensor: torch.Tensor, group: Any = None, reduce_op: Any = "mean") -> torch.Tensor:
        """Reduce in place over `group` by `reduce_op` (see `reduce_op_name`), as Lightning does: the
        mean of integers too, truncated to their type. A value that is no tensor, or one outside a
        process group, comes back as it is (as Lightning's)."""
        if not isinstance(tensor, torch.Tensor) or not dist.is_initialized():
            return tensor
        op = reduce_op_name(reduce_op)
        group = group if group is not None else dist.group.WORLD
        if op != "mean":
            dist.all_reduce(tensor, op=_TORCH_OPS[op], group=group)
            return tensor
        size = dist.get_world_size(group)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor.div_(size) if tensor.is_floating_point() else tensor.copy_(tensor / size)
