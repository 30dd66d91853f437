"""Fabric: the object a rank trains with (setup, backward, collectives, checkpoints, logging)."""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from datetime import timedelta
from functools import partial
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from lightning_utilities.core.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from nbfabric import checkpoint
from nbfabric.apply import apply_to_collection, as_tensors, move_to_device, to_scalars
from nbfabric.callbacks import call_hook
from nbfabric.config import RunConfig
from nbfabric.dataloaders import batch_samplers_recorded, shard
from nbfabric.devices import Accelerator
from nbfabric.launcher.environment import RankInfo, started_by_launcher
from nbfabric.launcher.launchers import Launcher, NodePlace, select_launcher
from nbfabric.launcher.output import Sink
from nbfabric.interop import tell_libraries
from nbfabric.metrics import MetricLog
from nbfabric.run_flags import DEBUG_ENV, check_timeout, with_launcher_world, with_run_command_settings
from nbfabric.seeding import seed_everything, seed_workers
from nbfabric.strategies import make_strategy, reduce_op_name, strategy_name
from nbfabric.init import SkippedInit
from nbfabric.rank_call import RankCall
from nbfabric.resident import Resident, kept_modules, resident, resume_all
from nbfabric.whole import Snapshot, snapshot, whole_copy
from nbfabric.tracebacks import raised_by_torch_distributed, users_stacklevel
from nbfabric.wrappers import FabricDataLoader, FabricModule, FabricOptimizer, to_cpu, uncompiled, unwrap, without_wrappers


CONSEQUENCE_EXIT_DELAY = 1.0  # seconds a script's rank failing in torch.distributed waits before it exits



def _do_nothing(*_: Any) -> None:
    """`launch()`'s function when none is given: the ranks go on with the calling script."""


class Fabric:
    """Lightning Fabric's API on plain torch.distributed.

    ``Fabric(accelerator="cpu", devices=2)``, then ``fabric.launch(fn)`` runs ``fn(fabric)`` on
    two ranks; in a script started by ``torchrun`` or ``nbfabric run``, ``fabric.launch()``
    joins the ranks already running.
    """

    def __init__(
        self,
        accelerator: str = "auto",
        strategy: Any = "auto",
        devices: int | str | Sequence[int] = "auto",
        num_nodes: int = 1,
        precision: str | int | None = None,
        plugins: Any = None,
        callbacks: Any = None,
        loggers: Any = None,
        *,
        start_method: str | None = None,
        timeout: float | timedelta | None = None,
    ):
        if plugins:
            raise ValueError("plugins are not supported; choose the precision with precision=...")
        settings = with_run_command_settings(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy_name(strategy),
            precision="32-true" if precision is None else precision,
            num_nodes=num_nodes,
            start_method=start_method,
        )
        self._configure(RunConfig.resolve(**with_launcher_world(settings)), strategy, timeout, callbacks, loggers)
        if type(self).run is not Fabric.run:  # a subclass's run(): calling it launches the ranks, as in Lightning
            self.run = partial(self.launch, _call_run)

    @classmethod
    def from_config(cls, config: RunConfig, *, timeout: float | timedelta | None = None, debug: bool = False) -> Fabric:
        """A Fabric for settings resolved already (`RunConfig.resolve`, as %%fabric cells and pools
        plan them): nothing is resolved again. `debug`: torch.distributed's collective checks in
        every rank (`--debug`)."""
        fabric = cls.__new__(cls)
        fabric._configure(config, config.strategy, timeout, None, None)
        fabric._debug = debug
        return fabric

    def _configure(self, config: RunConfig, strategy: Any, timeout: Any, callbacks: Any, loggers: Any) -> None:
        self.config = config
        self.timeout = check_timeout(timeout)
        self._debug = False
        self._ranks_stay = False  # the ranks outlive the run (a rank pool's)
        self._runs_here = False  # the run is this process's own (one device, or ranks a launcher started)
        self._resident: Resident | None = None  # what such a rank keeps between runs of these settings
        self._callbacks = _as_list(callbacks)
        self._loggers = _as_list(loggers)
        self._ranks = RankInfo(world_size=config.world_size)
        self._launched = False  # joined the run: a rank of it, with its process group
        self._launch_called = False
        self._strategy = make_strategy(config, strategy)
        self._precision = self._strategy.make_precision()
        self._metrics = MetricLog()
        if config.distributed and started_by_launcher():
            self._join_for_script()  # ranks a launcher started: the world is real from here on

    # ----------------------------------------------------------------- who am I
    @property
    def global_rank(self) -> int:
        """The index of this rank among all ranks of the run (0 before launch)."""
        return self._ranks.global_rank

    @property
    def local_rank(self) -> int:
        """The index of this rank among the ranks of its node."""
        return self._ranks.local_rank

    @property
    def node_rank(self) -> int:
        """The index of this rank's node."""
        return self._ranks.node_rank

    @property
    def world_size(self) -> int:
        """The number of ranks of the run (before launch: the number it will have)."""
        return self._ranks.world_size

    @property
    def is_global_zero(self) -> bool:
        """Whether this is global rank 0."""
        return self.global_rank == 0

    @property
    def accelerator(self) -> Accelerator:
        """The kind of device the run uses; `accelerator.name()` is 'cpu', 'cuda' or 'mps'."""
        return Accelerator(self.config.accelerator)

    @property
    def device(self) -> torch.device:
        """This rank's device (the GPU of its local rank, or the CPU)."""
        return self._strategy.device

    @property
    def strategy(self):
        """How modules are replicated or sharded and how ranks talk (DDP, FSDP, DeepSpeed, one device)."""
        return self._strategy

    @property
    def loggers(self) -> list[Any]:
        """The loggers given to `Fabric(loggers=...)`; `log` and `log_dict` write to each."""
        return self._loggers

    @property
    def logger(self) -> Any:
        """The first logger (None without any)."""
        return self._loggers[0] if self._loggers else None

    @property
    def logged_metrics(self) -> MetricLog:
        """Everything this rank logged, in order."""
        return self._metrics

    # ----------------------------------------------------------------- launching
    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Override in a subclass with the training code; calling ``fabric.run(...)`` then runs it on every rank."""

    def launch(self, function: Callable[..., Any] = _do_nothing, *args: Any, **kwargs: Any) -> Any:
        """Start the ranks and run ``function(fabric, *args, **kwargs)`` on each.

        Without a function: join ranks started by a launcher (torchrun-style environment), or,
        in a script, fork the ranks here and let each go on with the rest of the script.

        Returns:
            Rank 0's return value, on the CPU (modules and optimizers as the user's own objects).

        Raises:
            RankError: a rank failed (every other rank was stopped first); RankTimeoutError past `timeout`.
            TypeError: `function` is not callable, or takes no argument for the Fabric.
            RuntimeError: launched again in a process that is a rank of the run (launching again
                from the process that started the ranks, or with one device, runs again), or a bare
                launch() in a notebook.
        """
        if function is _do_nothing:
            if self.config.start_method == "spawn" and not started_by_launcher():  # `nbfabric run --start-method=spawn` started it
                raise TypeError(
                    f"To spawn processes with the `{self.config.strategy}` strategy, `.launch()` needs to be called with a "
                    "function that contains the code to launch in processes."
                )
            return self._launch(None, args, kwargs)
        _check_launchable(function)
        return self._launch(function, args, kwargs)

    def _launch(
        self,
        function: Callable[..., Any] | None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        *,
        launcher: Launcher | None = None,
        sink: Sink | None = None,
        place: NodePlace = NodePlace(),
        new_processes: bool = False,
        finish: Callable[[Fabric, Any], Any] | None = None,
    ) -> Any:
        """The one way a run starts (`launch`, %%fabric cells, `RankPool.launch`): through `launcher`,
        else the one `select_launcher` picks for the settings, every rank runs `_run_as_rank`."""
        if self._launch_called and self._launched and self.config.strategy != "single_device":
            # launching again from the process that started ranks, or with one device and nothing
            # to rejoin, runs again, as Lightning's does
            raise RuntimeError("this Fabric is already launched in this process, as a rank of its run; call launch() once per Fabric here")
        if function is not None:
            _check_launchable(function)
        self._launch_called = True
        launcher = launcher or select_launcher(self.config, timeout=self.timeout, sink=sink, place=place, new_processes=new_processes)
        self._ranks_stay = getattr(launcher, "ranks_stay", False)
        self._runs_here = getattr(launcher, "runs_here", False)
        if function is None:
            launcher.continue_script(prepare=self._strategy.preload)  # returns in each rank
            self._join_for_script()
            return None
        return launcher.launch(RankCall(self, function, args, kwargs or {}, finish), prepare=self._strategy.preload)

    def _run_as_rank(
        self, function: Callable[..., Any], args: tuple, kwargs: dict[str, Any], finish: Callable[[Fabric, Any], Any] | None = None
    ) -> Any:
        """A rank's whole part of a run: join it (device, process group), run the function, make
        sharded models whole (a collective), turn the value into what goes back (`finish`; by
        default on the CPU, or, in a run of this process's own, as returned), wait for the peers,
        and send what is still unsent."""
        self._join(RankInfo.from_environment())
        try:
            with batch_samplers_recorded():
                value = function(self, *args, **kwargs)
            if not self._ranks_stay:  # a pool's ranks keep their (sharded) models for the next run
                self._strategy.before_return()
            value = (finish or (_as_returned if self._runs_here else _on_cpu))(self, value)
            self._wait_for_peers()
            return value
        finally:
            self._metrics.close()
            self._strategy.release()

    def _whole(self, value: Any) -> Any:
        """`%fabric pull NAME` on a pool, on every rank: a model set up in an earlier run (it, or the
        module inside it) as a plain copy with the full weights on global rank 0 (a collective where
        it is sharded); any other value as it is."""
        for module in kept_modules() if self._ranks_stay else ():
            if value is module or value is module.module:
                return whole_copy(module.module, module.__dict__["_before_setup"])
        return value

    def _wait_for_peers(self) -> None:
        """A rank whose process ends after the run must not leave while a peer still talks to it.
        The ranks of one machine on the CPU meet through the launcher's store, where a rank that has
        ended counts as finished; others through a barrier, which fails when a peer has left already
        (sys.exit, or a failure reported for that peer). This rank's own result stands. A pool's
        ranks stay, so they do not wait: a barrier here would pair with a peer's stray one."""
        if self.world_size <= 1 or self._ranks_stay:
            return
        store = self._ranks.links.store if self._ranks.links is not None else None
        if store is not None and self.device.type == "cpu":
            store.wait_for_peers(self.global_rank, self.world_size)
            return
        try:
            self._strategy.barrier()
        except RuntimeError:
            pass

    def _join_for_script(self) -> None:
        """Join the run and stay in it for the rest of the script."""
        if not self._launched:
            self._join(RankInfo.from_environment())
            atexit.register(_leave_after_script, self)

    def _join(self, ranks: RankInfo) -> None:
        """Who this rank is; its device and process group (once)."""
        if self._launched:
            return
        self._ranks = ranks
        kept = resident(self.config, self._strategy, self._precision) if self._ranks_stay else None
        if kept is not None:  # a run with the settings of an earlier one on this rank goes on with its strategy
            self._strategy, self._precision, self._resident = kept.strategy, kept.precision, kept
        rank_zero_only.rank = ranks.global_rank
        if self._debug:
            os.environ.update(DEBUG_ENV)
        if os.environ.get("TORCH_DISTRIBUTED_DEBUG") and torch.distributed.is_available():
            torch.distributed.set_debug_level_from_env()  # torch read it at import, maybe before this rank was started
        tell_libraries(ranks.global_rank, ranks.world_size, self.config.accelerator, self.config.precision, new_rank=not self._ranks_stay)
        self._metrics.send_to(ranks.links.channel if ranks.links is not None else None)
        self._strategy.setup_environment(ranks)
        if self._ranks_stay:
            resume_all(after_stop=ranks.links is not None and ranks.links.after_stop)
        self._launched = True

    def _check_launched(self) -> None:
        """Before launch, a Fabric of several devices has no run to work in. After it, in the process
        that launched the ranks, it works as Lightning's does there: collectives with no peers."""
        if not (self._launched or self._launch_called) and self.config.distributed:
            raise RuntimeError(
                f"To use Fabric with more than one device ({self.config.world_size} here), call fabric.launch(fn) "
                "first and use it inside fn, use a %%fabric cell, or run the script with `nbfabric run`."
            )

    # ----------------------------------------------------------------- setup
    def setup(
        self,
        module: torch.nn.Module,
        *optimizers: torch.optim.Optimizer,
        scheduler: Any = None,
        move_to_device: bool = True,
        _reapply_compile: bool = True,
    ) -> Any:
        """Wrap the model (and its optimizers) for this run: device, precision, strategy.

        Args:
            module: the model.
            optimizers: its optimizers (DeepSpeed: exactly one).
            scheduler: returned last, as it is (it steps the optimizer it was made for).
            move_to_device: move the model to `fabric.device` first.
            _reapply_compile: for a `torch.compile`d model: True keeps the user's model (plain
                state_dict names) behind the compiled one; False takes the compiled module itself as
                the model (state_dict names start with ``_orig_mod.``), as Lightning does.

        Returns:
            The wrapped module, or (module, *optimizers), with the scheduler last when one is given.

        Raises:
            ValueError: a model or optimizer that is set up already.
        """
        if any(isinstance(optimizer, FabricOptimizer) for optimizer in optimizers):
            raise ValueError("An optimizer should be passed only once to the `setup` method.")
        module, original = self._prepare_module(module, move_to_device, _reapply_compile)
        before = self._snapshot(original)
        forward_module, prepared = self._strategy.setup_module_and_optimizers(module, [unwrap(o) for o in optimizers])
        wrapped_optimizers = self._wrap_optimizers(prepared)
        wrapped_module = self._wrap_module(forward_module, original, move_to_device, wrapped_optimizers, before)
        call_hook(self._callbacks, "on_after_setup", fabric=self, module=wrapped_module)  # as Lightning: not from setup_module
        if not optimizers:
            return wrapped_module
        wrapped = (wrapped_module, *wrapped_optimizers)
        return (*wrapped, scheduler) if scheduler is not None else wrapped

    def setup_module(self, module: torch.nn.Module, move_to_device: bool = True, _reapply_compile: bool = True) -> FabricModule:
        """The model wrapped for this run, without optimizers (set those up with `setup_optimizers`).
        A `torch.compile`d model keeps running compiled; see `setup` for `_reapply_compile`."""
        module, original = self._prepare_module(module, move_to_device, _reapply_compile)
        before = self._snapshot(original)
        return self._wrap_module(self._strategy.setup_module(module), original, move_to_device, before=before)

    def _prepare_module(self, module: torch.nn.Module, move_to_device: bool, inside_compiled: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The module in the precision's dtype on the device, and the user's model: the one inside a
        compiled module where `inside_compiled`."""
        self._check_launched()
        if isinstance(module, FabricModule):
            raise ValueError("A model should be passed only once to the `setup` method.")
        module = self._precision.convert_module(module)
        if move_to_device:
            _warn_if_spread(module)
            module = module.to(self.device)
        compiled = type(module).__name__ == "OptimizedModule"
        return module, module._orig_mod if compiled and inside_compiled else module

    def _snapshot(self, module: torch.nn.Module) -> Snapshot | None:
        """On a pool's rank, the module before its setup (for `_whole`)."""
        return snapshot(module) if self._resident is not None else None

    def _wrap_module(
        self,
        forward_module: torch.nn.Module,
        original: torch.nn.Module,
        moved: bool,
        optimizers: Sequence[FabricOptimizer] = (),
        before: Snapshot | None = None,
    ) -> FabricModule:
        first = next(original.parameters(), None)
        wrapped = FabricModule(forward_module, original, self._precision, self.device if moved or first is None else first.device)
        if self._resident is not None:
            self._resident.add(wrapped, optimizers)
            wrapped.__dict__["_before_setup"] = before
        if hasattr(original, "_fabric"):  # a LightningModule: its self.log and hooks go through this Fabric
            original._fabric = self
            original._fabric_optimizers = list(optimizers)
            if original not in self._callbacks:
                self._callbacks.append(original)
        return wrapped

    def setup_optimizers(self, *optimizers: torch.optim.Optimizer) -> Any:
        """Wrap optimizers of a model set up with `setup_module`; one optimizer, or a tuple of them.

        Raises:
            ValueError: no optimizer, or one that is already set up.
        """
        self._check_launched()
        if not optimizers:
            raise ValueError("`setup_optimizers` requires at least one optimizer as input.")
        if any(isinstance(optimizer, FabricOptimizer) for optimizer in optimizers):
            raise ValueError("An optimizer should be passed only once to the `setup_optimizers` method.")
        wrapped = self._wrap_optimizers([self._strategy.setup_optimizer(optimizer) for optimizer in optimizers])
        return wrapped[0] if len(wrapped) == 1 else wrapped

    def _wrap_optimizers(self, optimizers: Sequence[Any]) -> tuple[FabricOptimizer, ...]:
        # as Lightning's: with no callbacks yet, the optimizers get a list of their own, so a
        # LightningModule that `setup` adds afterwards is not called from their steps
        after_step = partial(call_hook, self._callbacks or [], "on_after_optimizer_step", strategy=self._strategy)
        step_with = partial(self._strategy.optimizer_step, precision=self._precision)
        return tuple(FabricOptimizer(optimizer, step_with, after_step) for optimizer in optimizers)

    def setup_dataloaders(
        self, *dataloaders: DataLoader, use_distributed_sampler: bool = True, move_to_device: bool = True
    ) -> Any:
        """Shard each loader across ranks (DistributedSampler, seeded by seed_everything) and move
        its batches to the device; one loader, or a list of them. After
        ``seed_everything(workers=True)``, each worker of each rank draws its own random numbers.

        Raises:
            ValueError: no loader, or one that is already set up.
            TypeError: something other than a torch DataLoader.
        """
        self._check_launched()
        if not dataloaders:
            raise ValueError("`setup_dataloaders` requires at least one dataloader as input.")
        if any(isinstance(loader, FabricDataLoader) for loader in dataloaders):
            raise ValueError("A dataloader should be passed only once to the `setup_dataloaders` method.")
        if any(not isinstance(loader, DataLoader) for loader in dataloaders):
            raise TypeError("Only PyTorch DataLoader are currently supported in `setup_dataloaders`.")
        wrapped = []
        for given in dataloaders:
            loader = given
            if use_distributed_sampler and self.config.strategy != "single_device":  # as Lightning: also for one rank of DDP
                loader = shard(loader, self.world_size, self.global_rank)
            seed_workers(loader, self.global_rank)
            wrapped.append(FabricDataLoader(loader, self.device if move_to_device else None, given))
        return wrapped[0] if len(wrapped) == 1 else wrapped

    # ----------------------------------------------------------------- training
    def backward(self, tensor: torch.Tensor, *args: Any, model: Any = None, **kwargs: Any) -> None:
        """Backward through `tensor` (the loss) with what the precision and strategy need: gradient
        scaling, the engine's backward. Other arguments go to `Tensor.backward`.

        Args:
            model: the set-up model the loss came from; DeepSpeed runs that model's engine backward
                (needed when several models are set up).

        Raises:
            TypeError: `model` is not a model returned by `setup`.
        """
        model = uncompiled(model)
        if model is not None and not isinstance(model, FabricModule):
            raise TypeError(f"backward(model=...) takes the model returned by fabric.setup(), not {type(model).__name__}")
        self._precision.in_backward = True
        try:
            self._strategy.backward(tensor, self._precision, *args, module=None if model is None else model._forward_module, **kwargs)
        finally:
            self._precision.in_backward = False

    def clip_gradients(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        clip_val: float | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = True,
    ) -> torch.Tensor | None:
        """Clip the gradients of the parameters `optimizer` updates, by value (`clip_val`) or by total
        norm (`max_norm`); exactly one of them.

        Returns:
            The total norm of the gradients before clipping (`max_norm`), else None.

        Raises:
            ValueError: both or neither of `clip_val` and `max_norm`.
        """
        if clip_val is not None and max_norm is not None:
            raise ValueError("Only one of `clip_val` or `max_norm` can be set as this specifies the underlying clipping algorithm!")
        if clip_val is None and max_norm is None:
            raise ValueError("You have to specify either `clip_val` or `max_norm` to do gradient clipping!")
        self._strategy.check_clip_gradients()
        optimizer = unwrap(optimizer)
        self._precision.unscale_gradients(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
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
        module = uncompiled(module)
        if not isinstance(module, FabricModule):
            raise TypeError("no_backward_sync needs the module returned by fabric.setup()")
        if not enabled:
            return nullcontext()
        return self._strategy.no_backward_sync(module._forward_module)

    def to_device(self, obj: Any) -> Any:
        """A module moved to the device in place; for anything else, every object in it that has a
        `.to()` (tensors, Hugging Face's BatchEncoding, your classes), through nested collections."""
        if isinstance(obj, torch.nn.Module):
            obj.to(self.device)
            return obj
        return move_to_device(obj, self.device)

    def init_module(self, empty_init: bool | None = None) -> ContextManager:
        """Create modules directly on the device, in the precision's dtype. `empty_init=True` skips
        the initialisation of weights (for weights about to be loaded from a checkpoint): they hold
        arbitrary values until then."""
        self._check_launched()
        stack = ExitStack()
        stack.enter_context(self.init_tensor())
        if empty_init:
            stack.enter_context(SkippedInit())
        return stack

    def init_tensor(self) -> ContextManager:
        """Create tensors directly on the device, in the precision's dtype."""
        return _stacked(self.device, self._precision.module_init_context())

    def sharded_model(self) -> ContextManager:
        """Deprecated in Lightning in favour of `init_module`; nothing to do here (modules are sharded by `setup`)."""
        warnings.warn("`Fabric.sharded_model()` is deprecated in favor of `Fabric.init_module()`.", DeprecationWarning, stacklevel=2)
        self._check_launched()
        return nullcontext()

    @staticmethod
    def seed_everything(seed: int | None = None, workers: bool | None = None, verbose: bool = True) -> int:
        """`nbfabric.seeding.seed_everything`, with DataLoader workers seeded per rank unless `workers=False`."""
        return seed_everything(seed, workers=True if workers is None else workers, verbose=verbose)

    # ----------------------------------------------------------------- collectives
    def barrier(self, name: str | None = None) -> None:
        """Wait until every rank reaches this point; `name` labels the wait in profiler traces."""
        self._check_launched()
        with torch.profiler.record_function(f"fabric.barrier({name})" if name else "fabric.barrier"):
            self._strategy.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` (any picklable object) on every rank."""
        self._check_launched()
        return self._strategy.broadcast(obj, src)

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        """Each tensor (or number) gathered from every rank of `group` (all by default), stacked along
        a new first dimension; with `sync_grads`, gradients flow back through the gather."""
        self._check_launched()
        gather = partial(self._strategy.all_gather, group=group, sync_grads=sync_grads)
        return apply_to_collection(as_tensors(data, self.device), torch.Tensor, gather)

    def all_reduce(self, data: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        """Each tensor (or number) reduced in place over every rank of `group`: mean (or avg), sum,
        min, max or product, in any case, or a torch.distributed.ReduceOp."""
        op = reduce_op_name(reduce_op)
        self._check_launched()
        return apply_to_collection(as_tensors(data, self.device), torch.Tensor, partial(self._strategy.all_reduce, group=group, reduce_op=op))

    @contextmanager
    def rank_zero_first(self, local: bool = False) -> Iterator[None]:
        """Rank 0 (of the node, with local=True) runs the block first, the others after it, waiting
        as long as it takes (a download may outlast the process group's timeout), as Lightning's do:
        through a gloo group of their own without a practical timeout, made and ended here."""
        first = (self.local_rank if local else self.global_rank) == 0
        dist = torch.distributed
        group = dist.new_group(backend="gloo", timeout=timedelta(days=10000)) if self._launched and dist.is_initialized() else None

        def barrier() -> None:
            if group is not None:
                group.monitored_barrier()

        try:
            if not first:
                barrier()
            yield
            if first:
                barrier()
        finally:
            try:
                barrier()  # every rank leaves together, as from Lightning's
            finally:
                if group is not None:
                    dist.destroy_process_group(group)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """`print` on local rank 0 only."""
        if self.local_rank == 0:
            print(*args, **kwargs)

    # ----------------------------------------------------------------- checkpoints
    def save(self, path: str | os.PathLike, state: dict[str, Any], filter: Any = None) -> None:
        """Rank 0 writes `state` (modules and optimizers as their state_dict) atomically; all ranks wait.
        `filter`: {key: callable(name, value) -> keep} for entries of the state to save in part."""
        checkpoint.check_filter(filter, state)
        self._strategy.save(checkpoint.resolve(path), state, self.is_global_zero, filter)

    def load(
        self,
        path: str | os.PathLike,
        state: dict[str, Any] | None = None,
        strict: bool = True,
        *,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Restore the objects in `state` in place and return the rest of the checkpoint. `path`: a
        file or directory, `~/...`, or an fsspec URL (`s3://...`: files only); `weights_only=None`
        is torch's default (True unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD), False only for a file you
        trust (it may run code)."""
        return self._strategy.load(checkpoint.resolve(path), state, strict=strict, weights_only=weights_only)

    def load_raw(self, path: str | os.PathLike, obj: Any, strict: bool = True, weights_only: bool | None = None) -> None:
        """Load a plain state_dict file (as saved by torch.save) into a module or optimizer, or a
        checkpoint into the modules and optimizers of a dict (in place, as `load`; the dict's other
        entries stay as they are, as Lightning leaves them); `weights_only=False` only for a file you
        trust (it may run code)."""
        path = checkpoint.resolve(path)
        if isinstance(obj, dict):
            self._strategy.load(path, dict(obj), strict=strict, weights_only=weights_only)
            return
        self._strategy.load_raw(unwrap(obj), checkpoint.read(path, weights_only=weights_only), strict=strict)

    # ----------------------------------------------------------------- logging and callbacks
    def log(self, name: str, value: Any, step: int | None = None) -> None:
        """Log one value (a number, or a one-element tensor) under `name`: to every logger and the dashboard."""
        self.log_dict({name: value}, step=step)

    def log_dict(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log several values: tensors at any depth become numbers, then every logger gets the dict
        and the notebook's dashboard each number (nested names joined with "/").

        Raises:
            ValueError: a tensor of more than one element.
        """
        metrics = to_scalars(metrics)
        self._metrics.record(self.global_rank, dict(_flattened(metrics)), step)
        for logger in self._loggers:
            logger.log_metrics(metrics=metrics, step=step)

    def call(self, hook_name: str, *args: Any, **kwargs: Any) -> None:
        """Call `hook_name` on every callback that has it, with the keyword arguments it takes; a
        callback attribute of that name that is not callable is skipped with a warning."""
        call_hook(self._callbacks, hook_name, *args, **kwargs)


def _flattened(metrics: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, value in metrics.items():
        if isinstance(value, dict):
            yield from _flattened(value, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", value


def _call_run(fabric: Fabric, *args: Any, **kwargs: Any) -> Any:
    return type(fabric).run(fabric, *args, **kwargs)


def _on_cpu(fabric: Fabric, value: Any) -> Any:
    return to_cpu(value)


def _as_returned(fabric: Fabric, value: Any) -> Any:
    """A run in this process returns what the function returned, as Lightning's does: tensors where
    they are, with their graphs, and set-up objects as they are (their forward keeps the precision),
    except under a strategy whose process group this run releases (DDP, FSDP, DeepSpeed on one
    device), where a wrapper would hold it: there the user's own objects."""
    return value if fabric.config.strategy == "single_device" else without_wrappers(value)


def _leave_after_script(fabric: Fabric) -> None:
    """At the end of a script's rank, leave the process group before Python's own teardown, which
    can abort the process (SIGABRT) while a gloo group's threads still run. After an uncaught
    exception (already printed) the group stays, so that the peers see this rank fail as it exits
    rather than leave first, and the process exits with status 1 before that teardown; a failure
    that torch.distributed raised (mostly a peer's failure seen from here) waits a moment first,
    so that the launcher sees the rank that failed first end first."""
    failure = getattr(sys, "last_value", None)
    if failure is None:
        fabric._wait_for_peers()  # a peer may still be joining the group this rank would tear down
        fabric.strategy.leave()
        return
    if raised_by_torch_distributed(failure):
        time.sleep(CONSEQUENCE_EXIT_DELAY)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(1)


def _check_launchable(function: Any) -> None:
    if not callable(function):
        raise TypeError(
            f"`Fabric.launch(...)` needs to be a callable, but got {function!r}. "
            "HINT: do `.launch(your_fn)` instead of `.launch(your_fn())`"
        )
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return
    if not parameters:
        raise TypeError(f"`Fabric.launch(function={function})` needs to take at least one argument: the Fabric object, passed in by the launcher.")


def _warn_if_spread(module: torch.nn.Module) -> None:
    devices = {p.device for p in module.parameters()}
    if len(devices) > 1:
        warnings.warn(
            f"The model passed to `Fabric.setup()` has parameters on different devices ({', '.join(sorted(map(str, devices)))}); "
            "all are moved to the run's device. Pass move_to_device=False to keep them where they are.",
            stacklevel=users_stacklevel(),
        )


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


@contextmanager
def _stacked(device: torch.device, dtype_context: ContextManager) -> Iterator[None]:
    with device, dtype_context:
        yield
