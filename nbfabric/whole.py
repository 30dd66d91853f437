"""A model a strategy set up, made whole again: what each submodule was before the strategy
touched it (`snapshot`), and a plain copy of the model with the full weights (`whole_copy`), for
a model that stays sharded on a pool's ranks while the notebook gets it whole."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass(frozen=True)
class Before:
    """One submodule before its setup: its class, attributes and hooks."""

    cls: type
    attributes: frozenset[str]
    hooks: frozenset[int]


Snapshot = dict[int, Before]  # id(submodule) -> what it was


def snapshot(module: torch.nn.Module) -> Snapshot:
    """What each submodule is now (so that what a strategy adds can be taken off again)."""
    return {id(m): Before(type(m), frozenset(vars(m)), frozenset(hook_ids(m))) for m in module.modules()}


def hook_dicts(module: torch.nn.Module) -> list[dict[int, Any]]:
    """The module's registries of hooks (forward, backward, state_dict ...), each id -> hook."""
    return [value for name, value in vars(module).items() if "hooks" in name and isinstance(value, dict)]


def hook_ids(module: torch.nn.Module) -> Iterator[int]:
    for hooks in hook_dicts(module):
        yield from hooks


def whole_copy(module: torch.nn.Module, before: Snapshot) -> torch.nn.Module | None:
    """On every rank (a collective where the parameters are sharded: FSDP, DeepSpeed ZeRO-3): a copy
    of `module` on the CPU as it was before its setup, holding the full weights, on global rank 0;
    None on the others. The model itself is left as it is."""
    parameters = list(module.parameters())
    full = _full_weights(parameters)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    memo: dict[int, Any] = {id(p): torch.nn.Parameter(full[id(p)], requires_grad=p.requires_grad) for p in parameters}
    for submodule in module.modules():
        was = before.get(id(submodule))
        if was is None:
            continue
        for name in set(vars(submodule)) - was.attributes:  # the strategy's: not copied (they hold the run)
            value = vars(submodule)[name]
            if not isinstance(value, (type(None), bool, int, float, str, bytes, tuple)):
                memo[id(value)] = None
        for hooks in hook_dicts(submodule):
            if set(hooks) - was.hooks:
                memo[id(hooks)] = type(hooks)((key, hook) for key, hook in hooks.items() if key in was.hooks)
    for submodule in module.modules():  # each of its own class again (FSDP gives sharded units one, which refuses copies)
        was = before.get(id(submodule))
        memo[id(submodule)] = object.__new__(type(submodule) if was is None else was.cls)
    for submodule in module.modules():
        copied, was = memo[id(submodule)], before.get(id(submodule))
        copied.__dict__.update(copy.deepcopy(vars(submodule), memo))
        for name in set(vars(copied)) - was.attributes if was is not None else ():
            delattr(copied, name)
    return memo[id(module)].to("cpu")


def _full_weights(parameters: list[torch.nn.Parameter]) -> dict[int, torch.Tensor]:
    """Each parameter's full value, a CPU copy (gathered from every rank where it is sharded)."""
    gathered: Any = nullcontext()
    if any(hasattr(p, "ds_id") for p in parameters):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(parameters)
    with gathered, torch.no_grad():
        return {id(p): (p.full_tensor() if hasattr(p, "full_tensor") else p.data).detach().to("cpu", copy=True) for p in parameters}
