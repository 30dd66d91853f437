"""DeepSpeed checkpoints and models: client state in and out, loads that run no code unless trusted,
one state dict from the shards, and a model made whole and ordinary again after training."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch

from nbfabric.checkpoint import enum_member, restore_entries, stateful
from nbfabric.launcher.environment import preserved_environment
from nbfabric.whole import Snapshot, hook_dicts
from nbfabric.wrappers import unwrap

CLIENT_KEY = "nbfabric"  # in DeepSpeed's client state: {"model_key": the key of the model in `state`, "extras": the rest}
TAG = "checkpoint"


def is_checkpoint(path: Path) -> bool:
    """A directory written by `fabric.save` under DeepSpeed."""
    return _model_states(path) is not None


def _model_states(path: Path) -> Path | None:
    """Rank 0's model-states file (ZeRO-3 writes one per rank, named zero_pp_rank_N_...)."""
    found = sorted((Path(path) / TAG).glob("*mp_rank_00_model_states.pt"))
    return found[0] if found else None


def _is_engine_object(value: Any, engine: Any) -> bool:
    inner = unwrap(value)
    return getattr(value, "_forward_module", None) is engine or (inner is engine.optimizer and inner is not None)


def client_state(state: dict[str, Any], engine: Any) -> dict[str, Any]:
    """Everything in `state` but the engine's model and optimizer, as state dicts; and the model's key."""
    extras = {key: unwrap(value) for key, value in state.items() if not _is_engine_object(value, engine)}
    extras = {key: value.state_dict() if stateful(value) else value for key, value in extras.items()}
    model_key = next(key for key, value in state.items() if getattr(value, "_forward_module", None) is engine)
    return {CLIENT_KEY: {"model_key": model_key, "extras": extras}}


def restore_client_state(state: dict[str, Any], client: dict[str, Any], engine: Any, *, strict: bool, path: Any) -> dict[str, Any]:
    """Restore the entries of `state` besides the engine's from the client state; return the rest."""
    wanted = [key for key, value in state.items() if not _is_engine_object(value, engine)]
    return restore_entries(path, state, wanted, dict(client[CLIENT_KEY]["extras"]), strict=strict)


@contextmanager
def trusted_loads(trusted: bool) -> Iterator[None]:
    """DeepSpeed loads its files with weights_only=False (which may run code): unless `trusted`,
    make every torch.load in the block weights_only, allowing only DeepSpeed's own plain types."""
    if trusted:
        yield
        return
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, (enum_member, "builtins.getattr")]
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original


def consolidate(directory: Path, *, trusted: bool) -> dict[str, Any]:
    """One state dict from a DeepSpeed checkpoint: the model's full fp32 weights under its key, and the client state."""
    with preserved_environment():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with trusted_loads(trusted):
        weights = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)
        client = torch.load(_model_states(directory), map_location="cpu", weights_only=not trusted)[CLIENT_KEY]
    return {client["model_key"]: dict(weights), **client["extras"]}


def unshard(engine: Any, before: Snapshot) -> None:
    """On every rank: the engine's module gets ordinary parameters holding the full weights (under
    ZeRO-3 gathered from all ranks, a collective), and loses the attributes and hooks DeepSpeed added."""
    import deepspeed

    module = engine.module
    parameters = list(module.parameters())
    with deepspeed.zero.GatheredParameters(parameters) if any(hasattr(p, "ds_id") for p in parameters) else nullcontext():
        full = {id(p): p.data.detach().clone() for p in parameters}
    engine.destroy()
    for submodule in module.modules():
        was = before.get(id(submodule))
        attributes, hooks = (was.attributes, was.hooks) if was is not None else (set(vars(submodule)), set())
        submodule._parameters = {
            name: None if p is None else torch.nn.Parameter(full[id(p)], requires_grad=p.requires_grad)
            for name, p in submodule._parameters.items()
        }
        for name in set(vars(submodule)) - attributes:
            delattr(submodule, name)
        for registered in hook_dicts(submodule):
            for key in [key for key in registered if key not in hooks]:
                del registered[key]
