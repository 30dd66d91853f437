"""DeepSpeed ZeRO (stages 1-3, optional CPU offload): the engine trains, checkpoints and steps.

deepspeed is imported only inside the ranks (and by `nbfabric consolidate`), never by the process
that forks them."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, ContextManager

import torch

from nbfabric import checkpoint
from nbfabric.launcher.environment import RankInfo
from nbfabric.precision import EnginePrecision, Precision
from nbfabric.strategies.ddp import DDPStrategy
from nbfabric.wrappers import unwrap

NAMED_STAGES = {
    "deepspeed": (2, False),
    "deepspeed_stage_1": (1, False),
    "deepspeed_stage_2": (2, False),
    "deepspeed_stage_2_offload": (2, True),
    "deepspeed_stage_3": (3, False),
    "deepspeed_stage_3_offload": (3, True),
}
_FP16 = {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}}
_BF16 = {"bf16": {"enabled": True}}
_PRECISION_SECTIONS = {"16-mixed": _FP16, "16-true": _FP16, "bf16-mixed": _BF16, "bf16-true": _BF16, "32-true": {}}


class DeepSpeedStrategy(DDPStrategy):
    """Trains through DeepSpeed's engine with ZeRO sharding of optimizer state (1), gradients (2) and parameters (3).

    ``DeepSpeedStrategy(stage=3, offload_optimizer=True, offload_parameters=True)``, or a whole
    DeepSpeed config: ``DeepSpeedStrategy(config="ds_config.json")`` (a dict or a JSON file; its
    own precision and batch settings win over the run's). `fabric.setup(model, optimizer)` takes
    exactly one optimizer; checkpoints are DeepSpeed's directories, one shard per rank.
    """

    name = "deepspeed"

    def __init__(
        self,
        stage: int = 2,
        *,
        offload_optimizer: bool = False,
        offload_parameters: bool = False,
        config: dict[str, Any] | str | os.PathLike | None = None,
        process_group_backend: str | None = None,
        timeout: Any = None,
    ):
        super().__init__(process_group_backend=process_group_backend, timeout=timeout)
        if stage not in (1, 2, 3):
            raise ValueError(f"DeepSpeedStrategy(stage={stage!r}) is not valid; choose a ZeRO stage: 1, 2 or 3")
        if offload_parameters and stage != 3:
            raise ValueError(f"offload_parameters=True needs ZeRO stage 3 (stage={stage}); offload_optimizer works from stage 1")
        self.stage, self.offload_optimizer, self.offload_parameters = stage, offload_optimizer, offload_parameters
        self.config = _read_config(config)
        self._engine: Any = None
        self._before_engine: dict[int, Any] = {}
        self._added_variables: list[str] = []  # set by setup_environment for a run of one process here

    @classmethod
    def named(cls, name: str) -> DeepSpeedStrategy:
        """The strategy of a Lightning name: deepspeed (stage 2), deepspeed_stage_1 ... deepspeed_stage_3_offload."""
        stage, offload = NAMED_STAGES[name]
        return cls(stage, offload_optimizer=offload, offload_parameters=offload and stage == 3)

    @property
    def engine_config(self) -> dict[str, Any]:
        """What `deepspeed.initialize` gets: the user's config, else one made from the stage, offload and precision."""
        if self.config is not None:
            return {"train_micro_batch_size_per_gpu": 1, **_PRECISION_SECTIONS[self.precision], **self.config}
        zero: dict[str, Any] = {"stage": self.stage}
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        if self.offload_parameters:
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        return {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "zero_optimization": zero,
            **_PRECISION_SECTIONS[self.precision],
        }

    def make_precision(self) -> Precision:
        return EnginePrecision(self.precision, self.device.type)

    def setup_environment(self, ranks: RankInfo) -> None:
        """Join the process group, then hand it to DeepSpeed (imported here, in the rank). DeepSpeed's
        engine reads the local rank from LOCAL_RANK, which a run of one process here lacks: it is set
        for the run, and `release` takes it (and DS_ACCELERATOR) out of this process's environment again."""
        self._added_variables = [name for name in ("LOCAL_RANK", "DS_ACCELERATOR") if name not in os.environ]
        os.environ.setdefault("LOCAL_RANK", str(ranks.local_rank))
        super().setup_environment(ranks)
        _deepspeed(self.device).init_distributed(dist_backend=self.backend, auto_mpi_discovery=False, verbose=False)

    def release(self) -> None:
        if self._private_group:
            for name in self._added_variables:
                os.environ.pop(name, None)
        super().release()

    def setup_module_and_optimizers(self, module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[Any, list[Any]]:
        """One engine for the module and its optimizer; the engine's (ZeRO) optimizer stands for the user's."""
        if len(optimizers) > 1:
            raise ValueError(f"DeepSpeed trains with exactly one optimizer; fabric.setup got {len(optimizers)}")
        from nbfabric.whole import snapshot

        self._before_engine = snapshot(module)
        engine, optimizer, _, _ = _deepspeed(self.device).initialize(
            model=module, optimizer=optimizers[0] if optimizers else None, config=self.engine_config, dist_init_required=False
        )
        self._engine = engine
        return engine, [optimizer] if optimizers else []

    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.setup_module_and_optimizers(module, [])[0]

    def resync(self, modules: list[torch.nn.Module], optimizers: list[Any]) -> None:
        """DeepSpeed's engine keeps its own copies of the parameters and each rank its own part of the
        optimizer state, which no rank can take from another: `resume_module` checks instead that
        the ranks stopped together."""

    def resume_module(self, module: torch.nn.Module, *, new_group: bool, after_stop: bool) -> str:
        """A DeepSpeed engine keeps the process group it was made in, in many places, and has no way
        to move to another one: after a stop that ended that group, it is refused. After a stop in
        the same group, it goes on only if every rank's engine stopped at the same step with the same
        weights (ZeRO 1 and 2 hold them whole on every rank): a stop can cut one rank's optimizer
        step short and not another's. A collective, made in the order of setup on every rank."""
        if new_group:
            return (
                "the DeepSpeed model set up before the stop is bound to the process group the stop ended, and DeepSpeed "
                "cannot move it to the new one: build and set up the model again (fabric.setup), and load its state from "
                "a checkpoint saved before (fabric.load)"
            )
        return self._stopped_apart(module) if after_stop else ""

    def _stopped_apart(self, engine: Any) -> str:
        """'' when every rank's engine is at the same step with the same weights, else why it cannot go on."""
        weights = 0.0  # ZeRO 3: each rank holds a part of the weights, which differ by design
        if self.stage < 3:
            with torch.no_grad():
                weights = float(sum(p.detach().double().sum() for p in engine.module.parameters()))
        mine = torch.tensor([float(getattr(engine, "global_steps", 0)), weights], dtype=torch.float64, device=self.device)
        everyone = self.all_gather(mine).cpu()
        seen = [tuple(part.view(torch.int64).tolist()) for part in everyone]  # bit for bit: NaN weights are alike
        if len(set(seen)) == 1:
            return ""
        steps = ", ".join(f"rank {rank}: step {int(part[0])}" for rank, part in enumerate(everyone))
        return (
            f"the stop landed inside the DeepSpeed model's optimizer step on some ranks and not on others ({steps}"
            f"{'' if len({s[0] for s in seen}) > 1 else '; their weights differ'}), and each rank owns its part of the "
            "optimizer state, which no rank can take from another: set up the model again (fabric.setup), and load its "
            "state from a checkpoint saved before (fabric.load)"
        )

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        raise RuntimeError("With DeepSpeed, set up the model and its optimizer together: fabric.setup(model, optimizer)")

    def backward(self, tensor: torch.Tensor, precision: Precision, *args: Any, module: torch.nn.Module | None = None, **kwargs: Any) -> None:
        engine = self._trained_engine() if module is None else module
        engine.backward(tensor, *args, **kwargs)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, precision: Precision, **kwargs: Any) -> Any:
        """The engine's step: it unscales, clips (the config's gradient_clipping), steps and zeroes the gradients."""
        if kwargs:
            raise ValueError("DeepSpeed's optimizer step takes no closure")
        return self._trained_engine().step()

    def check_clip_gradients(self) -> None:
        raise RuntimeError(
            "DeepSpeed clips gradients inside its step; set 'gradient_clipping' in the DeepSpeed config "
            "(DeepSpeedStrategy(config={..., 'gradient_clipping': 1.0})) instead of calling fabric.clip_gradients"
        )

    def no_backward_sync(self, module: torch.nn.Module) -> ContextManager:
        raise NotImplementedError(
            "DeepSpeed cannot skip the gradient synchronisation; accumulate gradients with "
            "'gradient_accumulation_steps' in its config, or choose strategy='ddp'"
        )

    def _trained_engine(self) -> Any:
        if self._engine is None or self._engine.optimizer is None:
            raise RuntimeError("With DeepSpeed, call fabric.setup(model, optimizer) before backward and optimizer steps")
        return self._engine

    def save(self, path: Any, state: dict[str, Any], is_global_zero: bool, filter: dict[str, Any] | None = None) -> None:
        """DeepSpeed's checkpoint directory (every rank writes its shard), put in place of `path` once complete;
        everything in `state` besides the model and optimizer goes in as client state."""
        from nbfabric.strategies.deepspeed_checkpoint import TAG, client_state

        if filter is not None:
            raise ValueError("fabric.save(filter=...) is not available with DeepSpeed, whose engine saves the whole model and optimizer")
        extras = client_state(state, self._engine_in(state))

        def write(directory: Path) -> None:
            self._engine.save_checkpoint(str(directory), tag=TAG, client_state=extras)

        checkpoint.replace_directory(path, write, is_global_zero, self.barrier)

    def load(self, path: Any, state: dict[str, Any] | None, *, strict: bool, weights_only: bool | None) -> dict[str, Any]:
        """Restore the engine (model, and optimizer where `state` has it) and the client state from a DeepSpeed directory."""
        from nbfabric.strategies.deepspeed_checkpoint import TAG, is_checkpoint, restore_client_state, trusted_loads

        if isinstance(path, str):
            raise ValueError(f"{path!r}: DeepSpeed's checkpoints are directories on a local (or mounted) disk, not URLs")
        checkpoint.recover_replaced(path)
        if not is_checkpoint(path):
            raise ValueError(
                f"{os.fspath(path)!r} is not a checkpoint written by fabric.save under DeepSpeed; "
                "load a single-file checkpoint into the model before fabric.setup (model.load_state_dict)"
            )
        state = state if state is not None else {}
        engine = self._engine_in(state)
        with_optimizer = any(unwrap(value) is engine.optimizer for value in state.values())
        with trusted_loads(weights_only is False):
            _, client = engine.load_checkpoint(
                os.fspath(path), tag=TAG, load_module_strict=strict,
                load_optimizer_states=with_optimizer, load_lr_scheduler_states=False,
            )
        return restore_client_state(state, client, engine, strict=strict, path=path)

    def load_raw(self, target: Any, state: dict[str, Any], *, strict: bool) -> None:
        """Refused for the engine's model and optimizer: the engine keeps weights of its own (ZeRO's
        fp32 copy, ZeRO-3's shards), which a state loaded into the module would not reach: its next
        step would undo the load."""
        engine = self._engine
        if engine is not None and any(target is part for part in (engine.module, engine.optimizer, getattr(engine.optimizer, "optimizer", None))):
            raise ValueError(
                "fabric.load_raw cannot load into a model or optimizer set up under DeepSpeed, whose engine keeps its own "
                "copy of the weights: load the state dict into the model before fabric.setup (model.load_state_dict), "
                "or fabric.load a checkpoint that fabric.save wrote under DeepSpeed"
            )
        super().load_raw(target, state, strict=strict)

    def _engine_in(self, state: dict[str, Any]) -> Any:
        engines = [value for value in state.values() if getattr(value, "_forward_module", None) is self._engine is not None]
        if len(engines) != 1:
            raise ValueError(
                f"With DeepSpeed, the state to save or load holds exactly one model set up with its optimizer; it holds {len(engines)}"
            )
        return self._engine

    def before_return(self) -> None:
        """On every rank, once the run's function is done: make the model whole again (ZeRO-3 gathers
        each parameter, a collective) as ordinary parameters, and let go of the engine's hooks."""
        if self._engine is None:
            return
        from nbfabric.strategies.deepspeed_checkpoint import unshard

        unshard(self._engine, self._before_engine)
        self._engine = None


def _read_config(config: Any) -> dict[str, Any] | None:
    if config is None or isinstance(config, dict):
        return config
    path = Path(config)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"DeepSpeedStrategy(config={os.fspath(config)!r}) must be a dict or a readable JSON file: {error}") from None


def _deepspeed(device: torch.device) -> Any:
    """deepspeed, imported for this rank's kind of device."""
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.utils.logger.addFilter(_ExpectedNotices())
    # DeepSpeed's own calls of torch functions torch has renamed: nothing the user can change.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", category=FutureWarning
    )
    if device.type == "cpu":
        # DeepSpeed would compile (a minute, with a C++ compiler) a shared-memory all-reduce that
        # serves only inference kernels; training's collectives go through torch.distributed.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class _ExpectedNotices(logging.Filter):
    """Drops DeepSpeed's warning about a torch optimizer under ZeRO: nbfabric allows the user's own optimizer on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()
