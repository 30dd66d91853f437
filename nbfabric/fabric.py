"""Fabric: the object a rank trains with (setup, backward, collectives, checkpoints, logging)."""

from __future__ import annotations

import atexit
import json
import os
import sys
import warnings
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch.utils._pytree import tree_map_only
from torch.utils.data import DataLoader

from nbfabric import checkpoint, launcher
from nbfabric.config import RunConfig
from nbfabric.dataloaders import shard
from nbfabric.metrics import MetricLog
from nbfabric.precision import Precision
from nbfabric.seeding import seed_everything
from nbfabric.strategies import FSDP, REDUCE_OPS, make_strategy
from nbfabric.wrappers import FabricDataLoader, FabricModule, FabricOptimizer, move_to_device, unwrap

_RANK_VARIABLES = ("RANK", "WORLD_SIZE")


class Fabric:
    """Lightning Fabric's API on plain torch.distributed.

    ``Fabric(accelerator="cpu", devices=2)``, then ``fabric.launch(fn)`` runs ``fn(fabric)`` on
    two ranks; in a script started by ``torchrun`` or ``nbfabric run``, ``fabric.launch()``
    joins the ranks already running.
    """

    def __init__(
        self,
        accelerator: str = "auto",
        strategy: str = "auto",
        devices: int | str | Sequence[int] = "auto",
        num_nodes: int = 1,
        precision: str | int | None = None,
        plugins: Any = None,
        callbacks: Any = None,
        loggers: Any = None,
        *,
        start_method: str = "fork",
        timeout: float | None = None,
    ):
        if plugins:
            raise ValueError("plugins are not supported; choose the precision with precision=...")
        fsdp_options = strategy if isinstance(strategy, FSDP) else None
        settings = _with_launcher_flags(
            accelerator=accelerator,
            devices=devices,
            strategy="fsdp" if fsdp_options else strategy,
            precision="32-true" if precision is None else precision,
            num_nodes=num_nodes,
            start_method=start_method,
        )
        self.config = RunConfig.resolve(**settings)
        self.timeout = timeout
        self._callbacks = _as_list(callbacks)
        self._loggers = _as_list(loggers)
        self._ranks = (0, 0, 0, self.config.world_size)  # global, local, node rank; world size
        self._launched = False
        self._strategy = make_strategy(self.config, fsdp_options)
        self._precision = Precision(self.config.precision, self.config.accelerator)
        self._metrics = MetricLog()

    # ----------------------------------------------------------------- who am I
    @property
    def global_rank(self) -> int:
        return self._ranks[0]

    @property
    def local_rank(self) -> int:
        return self._ranks[1]

    @property
    def node_rank(self) -> int:
        return self._ranks[2]

    @property
    def world_size(self) -> int:
        return self._ranks[3]

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def device(self) -> torch.device:
        return self._strategy.device

    @property
    def strategy(self):
        return self._strategy

    @property
    def loggers(self) -> list[Any]:
        return self._loggers

    @property
    def logger(self) -> Any:
        return self._loggers[0] if self._loggers else None

    @property
    def logged_metrics(self) -> MetricLog:
        """Everything this rank logged, in order."""
        return self._metrics

    # ----------------------------------------------------------------- launching
    def launch(self, function: Callable[..., Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        """Start the ranks and run ``function(fabric, *args, **kwargs)`` on each; return rank 0's result.

        Without a function: join ranks started by a launcher (torchrun-style environment), or,
        in a script, fork the ranks here and let each go on with the rest of the script.
        """
        if self._launched:
            raise RuntimeError("this Fabric is already launched; call launch() once per Fabric")
        if _started_by_launcher() or not self.config.distributed:
            if function is None:
                self._continue_script_as_rank()
                return None
            self._become_rank()
            try:
                return function(self, *args, **kwargs)
            finally:
                self._strategy.release()
        if function is None and _interactive():
            raise RuntimeError(
                "fabric.launch() without a function cannot start ranks in a notebook; "
                "use fabric.launch(train_fn) or a %%fabric cell."
            )
        result = self.start_ranks(function, args, kwargs)
        if function is None:  # only a rank gets here: go on with the caller's script
            self._continue_script_as_rank()
        return result

    def _continue_script_as_rank(self) -> None:
        """Join the run for the rest of the script, and leave its process group before Python's own
        teardown, which can abort the process (SIGABRT) while a gloo group's threads still run."""
        self._become_rank()
        atexit.register(self._leave_after_script)

    def _leave_after_script(self) -> None:
        # After an uncaught exception the group stays: the peers must see this rank fail as it
        # exits, not leave early and then fail (which would blame them first).
        if getattr(sys, "last_value", None) is None:
            self._strategy.leave()

    def start_ranks(
        self,
        function: Callable[..., Any] | None,
        args: tuple = (),
        kwargs: dict | None = None,
        sink: Any = None,
        *,
        node_rank: int = 0,
        main_address: str = "127.0.0.1",
        main_port: int | None = None,
    ) -> Any:
        """Start this node's ranks as new processes, even for one device; `sink` receives their output.
        With several nodes, node 0 hosts the rendezvous at `main_address:main_port` (29500 by default).
        Every node of one run must start this way (a `%%fabric` cell or `Fabric.start_ranks`);
        nodes started by `nbfabric run` meet through torch.distributed.run instead."""
        self.check_node_settings(node_rank)
        if main_port is None and self.config.num_nodes > 1:
            main_port = MULTI_NODE_PORT
        target = None if function is None else partial(self._run_rank, function, args, kwargs or {})
        if self.config.start_method == "fork":
            self._strategy.preload()
        return launcher.launch(
            target,
            nprocs=self.config.num_processes,
            start_method=self.config.start_method,
            num_nodes=self.config.num_nodes,
            node_rank=node_rank,
            main_address=main_address,
            main_port=main_port,
            timeout=self.timeout,
            sink=sink,
            wait_for_exit=self.config.accelerator != "cpu",
        )

    def check_node_settings(self, node_rank: int = 0) -> None:
        """Raise ValueError, before anything starts, for a node rank outside the run."""
        if not 0 <= node_rank < self.config.num_nodes:
            raise ValueError(
                f"node_rank={node_rank} is not valid with num_nodes={self.config.num_nodes}; "
                f"use 0 to {self.config.num_nodes - 1}"
            )

    def _run_rank(self, function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """In a rank the launcher started. The process ends right after, which ends its process group
        too: a barrier keeps a rank from leaving while a peer still talks to it (destroying the group
        would do the same in about 20 ms instead of 1)."""
        self._become_rank()
        try:
            result = to_cpu(function(self, *args, **kwargs))
            self._strategy.barrier()
            return result
        finally:
            self._metrics.close()

    def _become_rank(self) -> None:
        env = os.environ
        if _started_by_launcher():
            self._ranks = (
                int(env["RANK"]),
                int(env.get("LOCAL_RANK", 0)),
                int(env.get("NODE_RANK", env.get("GROUP_RANK", 0))),
                int(env["WORLD_SIZE"]),
            )
        index = self.config.device_ids[self.local_rank % self.config.num_processes]
        device = torch.device(self.config.accelerator, index) if self.config.accelerator == "cuda" else self.device
        self._strategy.device = device
        self._strategy.setup_environment(self.global_rank, self.world_size)
        self._launched = True

    def _check_launched(self) -> None:
        if not self._launched and self.config.distributed:
            raise RuntimeError(
                f"this Fabric runs on {self.config.world_size} devices: call fabric.launch(fn) first "
                "and use it inside fn (or use a %%fabric cell)."
            )

    # ----------------------------------------------------------------- setup
    def setup(self, module: torch.nn.Module, *optimizers: torch.optim.Optimizer, move_to_device: bool = True) -> Any:
        """Wrap the model (and its optimizers) for this run: device, precision, strategy."""
        module = self.setup_module(module, move_to_device=move_to_device)
        if not optimizers:
            return module
        return (module, *self._wrap_optimizers(optimizers))

    def setup_module(self, module: torch.nn.Module, move_to_device: bool = True) -> FabricModule:
        self._check_launched()
        module = self._precision.convert_module(unwrap(module))
        if move_to_device:
            module = module.to(self.device)
        return FabricModule(self._strategy.setup_module(module), module, self._precision)

    def setup_optimizers(self, *optimizers: torch.optim.Optimizer) -> Any:
        wrapped = self._wrap_optimizers(optimizers)
        return wrapped[0] if len(wrapped) == 1 else wrapped

    def _wrap_optimizers(self, optimizers: Sequence[torch.optim.Optimizer]) -> tuple[FabricOptimizer, ...]:
        return tuple(
            FabricOptimizer(self._strategy.setup_optimizer(unwrap(optimizer)), self._precision) for optimizer in optimizers
        )

    def setup_dataloaders(
        self, *dataloaders: DataLoader, use_distributed_sampler: bool = True, move_to_device: bool = True
    ) -> Any:
        """Shard each loader across ranks (DistributedSampler) and move its batches to the device."""
        self._check_launched()
        wrapped = []
        for loader in dataloaders:
            if use_distributed_sampler and self.world_size > 1:
                loader = shard(loader, self.world_size, self.global_rank)
            wrapped.append(FabricDataLoader(loader, self.device if move_to_device else None))
        return wrapped[0] if len(wrapped) == 1 else tuple(wrapped)

    # ----------------------------------------------------------------- training
    def backward(self, tensor: torch.Tensor, *args: Any, model: Any = None, **kwargs: Any) -> None:
        self._precision.backward(tensor, *args, **kwargs)

    def clip_gradients(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        clip_val: float | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = True,
    ) -> torch.Tensor | None:
        """Clip by value (`clip_val`) or by total norm (`max_norm`, returned); exactly one of them."""
        if (clip_val is None) == (max_norm is None):
            raise ValueError("clip_gradients needs exactly one of clip_val= or max_norm=")
        self._precision.unscale_gradients(unwrap(optimizer))
        parameters = [p for p in unwrap(module).parameters() if p.grad is not None]
        if clip_val is not None:
            torch.nn.utils.clip_grad_value_(parameters, clip_val)
            return None
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite=error_if_nonfinite)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded gradients: the global norm

    def autocast(self) -> ContextManager:
        """The precision's autocast, for code that runs outside the model's forward."""
        return self._precision.forward_context()

    def no_backward_sync(self, module: FabricModule, enabled: bool = True) -> ContextManager:
        """Skip the gradient all-reduce in backward (gradient accumulation)."""
        if not isinstance(module, FabricModule):
            raise TypeError("no_backward_sync needs the module returned by fabric.setup()")
        if not enabled:
            return nullcontext()
        return self._strategy.no_backward_sync(module._forward_module)

    def to_device(self, obj: Any) -> Any:
        if isinstance(obj, torch.nn.Module):
            return obj.to(self.device)
        return move_to_device(obj, self.device)

    def init_module(self, empty_init: bool | None = None) -> ContextManager:
        """Create modules directly on the device, in the precision's dtype."""
        return _stacked(self.device, self._precision.module_init_context())

    def init_tensor(self) -> ContextManager:
        """Create tensors directly on the device, in the precision's dtype."""
        return _stacked(self.device, self._precision.module_init_context())

    @staticmethod
    def seed_everything(seed: int | None = None, workers: bool = False) -> int:
        return seed_everything(seed, workers=workers)

    # ----------------------------------------------------------------- collectives
    def barrier(self, name: str | None = None) -> None:
        self._strategy.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self._strategy.broadcast(obj, src)

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        """Each tensor (or number) gathered from every rank, stacked along a new first dimension."""
        return tree_map_only(torch.Tensor, self._strategy.all_gather, self._as_tensors(data))

    def all_reduce(self, data: Any, group: Any = None, reduce_op: str = "mean") -> Any:
        """Each tensor (or number) reduced over every rank: mean, sum, min, max or product."""
        if reduce_op not in REDUCE_OPS:
            raise ValueError(f"reduce_op={reduce_op!r} is not valid; choose one of {', '.join(REDUCE_OPS)}")
        return tree_map_only(torch.Tensor, lambda t: self._strategy.all_reduce(t, reduce_op), self._as_tensors(data))

    def _as_tensors(self, data: Any) -> Any:
        """Numbers (also inside collections) become tensors on the device, as collectives need."""
        numbers_as_tensors = tree_map_only((int, float, bool), lambda x: torch.tensor(x, device=self.device), data)
        return move_to_device(numbers_as_tensors, self.device)

    @contextmanager
    def rank_zero_first(self, local: bool = False) -> Iterator[None]:
        """Rank 0 (of the node, with local=True) runs the block first, the others after it."""
        first = (self.local_rank if local else self.global_rank) == 0
        if not first:
            self.barrier()
        yield
        if first:
            self.barrier()

    def print(self, *args: Any, **kwargs: Any) -> None:
        """`print` on local rank 0 only."""
        if self.local_rank == 0:
            print(*args, **kwargs)

    # ----------------------------------------------------------------- checkpoints
    def save(self, path: str | os.PathLike, state: dict[str, Any], filter: Any = None) -> None:
        """Rank 0 writes `state` (modules and optimizers as their state_dict) atomically; all ranks wait."""
        if filter is not None:
            raise ValueError("save(filter=...) is not supported; pass only the state you want saved")
        self._strategy.save(path, state, self.is_global_zero)

    def load(
        self,
        path: str | os.PathLike,
        state: dict[str, Any] | None = None,
        strict: bool = True,
        *,
        weights_only: bool = True,
    ) -> dict[str, Any]:
        """Restore the objects in `state` in place and return the rest of the checkpoint."""
        return checkpoint.load_into(path, state, strict=strict, weights_only=weights_only)

    def load_raw(self, path: str | os.PathLike, obj: Any, strict: bool = True) -> None:
        """Load a plain state_dict file (as saved by torch.save) into a module or optimizer."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        target = unwrap(obj)
        if isinstance(target, torch.nn.Module):
            target.load_state_dict(state, strict=strict)
        else:
            target.load_state_dict(state)

    # ----------------------------------------------------------------- logging and callbacks
    def log(self, name: str, value: Any, step: int | None = None) -> None:
        self.log_dict({name: value}, step=step)

    def log_dict(self, metrics: dict[str, Any], step: int | None = None) -> None:
        metrics = {name: _plain(value) for name, value in metrics.items()}
        self._metrics.record(self.global_rank, metrics, step)
        for logger in self._loggers:
            logger.log_metrics(metrics, step=step)

    def call(self, hook_name: str, *args: Any, **kwargs: Any) -> None:
        """Call `hook_name(*args, **kwargs)` on every callback that defines it."""
        for callback in self._callbacks:
            method = getattr(callback, hook_name, None)
            if callable(method):
                method(*args, **kwargs)


def to_cpu(data: Any) -> Any:
    """Tensors and modules moved to the CPU; Fabric wrappers replaced by the user's objects."""
    data = unwrap(data)
    if isinstance(data, torch.nn.Module):
        return data.cpu()
    return tree_map_only(torch.Tensor, lambda t: t.detach().cpu(), data)


_DEFAULTS = {"accelerator": "auto", "devices": "auto", "strategy": "auto", "precision": "32-true", "num_nodes": 1, "start_method": "fork"}
LAUNCHER_FLAGS_ENV = "NBFABRIC_FLAGS"
MULTI_NODE_PORT = 29500  # node 0's rendezvous port when none is given, as torchrun's


def _with_launcher_flags(**given: Any) -> dict[str, Any]:
    """Settings from `nbfabric run` (passed in NBFABRIC_FLAGS) fill in what the code left at its
    default; a value the code sets that resolves differently is an error, as with Lightning's `fabric run`."""
    flags = json.loads(os.environ.get(LAUNCHER_FLAGS_ENV, "{}"))
    if not flags:
        return given
    merged = {**given, **flags}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the comparison must not repeat resolve()'s warnings
        expected = RunConfig.resolve(**merged)
        for name, value in flags.items():
            if given[name] != _DEFAULTS[name] and RunConfig.resolve(**{**merged, name: given[name]}) != expected:
                raise ValueError(
                    f"Fabric({name}={given[name]!r}) conflicts with `nbfabric run --{name.replace('_', '-')}={value}`; "
                    "set it in one place only."
                )
    return merged


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _started_by_launcher() -> bool:
    return all(name in os.environ for name in _RANK_VARIABLES)


def _interactive() -> bool:
    return hasattr(sys, "ps1") or "ipykernel" in sys.modules


@contextmanager
def _stacked(device: torch.device, dtype_context: ContextManager) -> Iterator[None]:
    with device, dtype_context:
        yield
