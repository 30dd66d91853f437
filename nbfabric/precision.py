"""What a precision setting does to modules, inputs, forward passes, backward and optimizer steps."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterator

import torch

from nbfabric.apply import convert_floats

_MIXED = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
_TRUE = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "64-true": torch.float64}


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily make `dtype` the default floating point type."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class Precision:
    """One precision setting ("32-true", "bf16-mixed", ...) on one device type."""

    def __init__(self, name: str, device_type: str, *, strategy_backward: bool = False):
        self.name = name
        self.device_type = device_type
        self.autocast_dtype = _MIXED.get(name)
        self.param_dtype = _TRUE.get(name)
        self._scales_gradients = name == "16-mixed" and device_type == "cuda"
        self._scaler: torch.amp.GradScaler | None = None
        self._strategy_backward = strategy_backward  # the strategy has steps of its own in fabric.backward (FSDP)
        self.in_backward = False  # set by fabric.backward while it runs

    @property
    def requires_fabric_backward(self) -> bool:
        """Whether a plain `loss.backward()` is refused: where Lightning's is, under the mixed
        precisions (whose backward scales the loss where it must) and strategies with backward steps
        of their own."""
        return self.autocast_dtype is not None or self._strategy_backward

    def guard_backward(self, tensor: torch.Tensor) -> torch.Tensor:
        """Make a backward through `tensor` that does not come from `fabric.backward` raise."""
        if tensor.requires_grad:
            tensor.register_hook(self._refuse_plain_backward)
        return tensor

    def _refuse_plain_backward(self, _: torch.Tensor) -> None:
        if not self.in_backward:
            raise RuntimeError(
                f"With precision={self.name!r} here, call fabric.backward(loss) instead of loss.backward(): "
                "it applies what the precision and strategy need (gradient scaling, the engine's backward)."
            )

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The gradient scaler of 16-mixed on CUDA, made at first use: in a rank, never in the
        process that forks the ranks (making one there asks CUDA whether it is available)."""
        if self._scales_gradients and self._scaler is None:
            self._scaler = torch.amp.GradScaler("cuda")
        return self._scaler

    def forward_context(self) -> ContextManager:
        """Around the model's forward pass (and `fabric.autocast()`)."""
        if self.autocast_dtype is not None:
            return torch.autocast(self.device_type, dtype=self.autocast_dtype)
        return self.module_init_context()

    def module_init_context(self) -> ContextManager:
        """Around module and tensor creation: true-precision modes change the default dtype."""
        return default_dtype(self.param_dtype) if self.param_dtype is not None else nullcontext()

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module in the precision's dtype: 64-true turns floating-point tensors into float64
        (`double()`, which leaves complex ones complex), 16-true and bf16-true every tensor `to` it."""
        if self.param_dtype is torch.float64:
            return module.double()
        return module.to(dtype=self.param_dtype) if self.param_dtype is not None else module

    def convert_input(self, data: Any) -> Any:
        """Floating-point inputs in the precision's dtype (16-bit under the mixed settings too, as Lightning)."""
        dtype = self.autocast_dtype or self.param_dtype
        return data if dtype is None else convert_floats(data, dtype)

    def convert_output(self, data: Any) -> Any:
        if self.name == "32-true":
            return data
        return convert_floats(data, torch.get_default_dtype())

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(*args, **kwargs)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Any:
        """Step; with a gradient scaler, a step with inf/NaN gradients is skipped."""
        if self.scaler is None:
            return optimizer.step(**kwargs)
        result = self.scaler.step(optimizer, **kwargs)
        self.scaler.update()
        return result

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Before clipping: gradients back to their true scale."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)


class EnginePrecision(Precision):
    """A precision that an engine (DeepSpeed) applies to the module and gradients itself: no autocast
    or gradient scaling here; floating-point inputs are converted to the engine's 16-bit dtype."""

    def __init__(self, name: str, device_type: str):
        super().__init__(name, device_type)
        self.input_dtype = _MIXED.get(name) or _TRUE.get(name)
        self.autocast_dtype = None
        self._scales_gradients = False

    @property
    def requires_fabric_backward(self) -> bool:
        return True

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def convert_input(self, data: Any) -> Any:
        return data if self.input_dtype is None else convert_floats(data, self.input_dtype)
