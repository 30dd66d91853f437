"""Building modules without initialising their weights (`fabric.init_module(empty_init=True)`)."""

from __future__ import annotations

from typing import Any

from torch.overrides import TorchFunctionMode


class SkippedInit(TorchFunctionMode):
    """Inside it, the functions of `torch.nn.init` leave their tensor as it is (memory not yet
    written): for weights a checkpoint will overwrite, so building a large model costs no init."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs.get("tensor", args[0] if args else None)
        return func(*args, **kwargs)
