"""What `fabric.setup*` returns: a module, optimizer and dataloader that apply the run's settings."""

from __future__ import annotations

import copy
import functools
import inspect
import sys
from types import MethodType
from typing import Any, Callable, Iterator

import torch
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import DataLoader

from nbfabric.apply import apply_to_collection, move_to_device
from nbfabric.precision import Precision

STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")  # forward methods from the start


class FabricModule(torch.nn.Module):
    """Runs the forward pass of the strategy's wrapper under the precision setting.

    Attributes not found here come from the original module; `state_dict` is the original's.
    A method of the original module other than `forward` runs through the strategy's wrapper once
    marked with `mark_forward_method` (the step methods are marked from the start); an unmarked
    one that runs a submodule with gradients enabled raises, since it would bypass the wrapper
    (DDP's gradient sync). With gradients off (`torch.no_grad`, `inference_mode`, as in Hugging
    Face's `generate`) nothing can go out of sync, and it runs.
    """

    def __init__(self, forward_module: torch.nn.Module, original_module: torch.nn.Module, precision: Precision, device: torch.device):
        super().__init__()
        self._forward_module = forward_module
        self._original_module = original_module  # a child too, as in Lightning (apply() visits it twice under DDP)
        self.__dict__["_precision"] = precision
        self.__dict__["_forward_methods"] = set(STEP_METHODS)
        self.__dict__["_setup_device"] = device
        self.__dict__["_unusable"] = ""

    @property
    def module(self) -> torch.nn.Module:
        """The module as the user built it, without wrappers."""
        return self._original_module

    @property
    def device(self) -> torch.device:
        """Where the module's parameters are (where setup put it, for a module without any)."""
        first = _first_tensor(self._original_module)
        return self._setup_device if first is None else first.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the module's floating-point parameters (the default dtype for a module without any)."""
        first = _first_tensor(self._original_module, floating=True)
        return torch.get_default_dtype() if first is None else first.dtype

    def mark_unusable(self, reason: str) -> None:
        """From now on, running the module raises `reason` (its strategy cannot go on with it)."""
        self.__dict__["_unusable"] = reason

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._unusable:
            raise RuntimeError(self._unusable)
        args, kwargs = self._precision.convert_input((args, kwargs))
        with self._precision.forward_context():
            output = self._forward_module(*args, **kwargs)
        output = self._precision.convert_output(output)
        if self._precision.requires_fabric_backward:
            apply_to_collection(output, torch.Tensor, self._precision.guard_backward)
        return output

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._original_module.state_dict(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        """Set on the user's module (a new submodule lands in its state_dict and is trained); a name
        this wrapper has itself (`training`, its own attributes) is set here too."""
        original = self.__dict__.get("_modules", {}).get("_original_module")
        if original is None:  # still in __init__
            super().__setattr__(name, value)
            return
        here = name in dir(self)
        if hasattr(original, name) or not here:
            setattr(original, name, value)
        if here:
            super().__setattr__(name, value)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self._original_module.load_state_dict(state_dict, strict=strict, assign=assign)

    def mark_forward_method(self, method: MethodType | str) -> None:
        """Run the original module's `method` (or method name) through the strategy's wrapper, as `forward` runs."""
        if not isinstance(method, (MethodType, str)):
            raise TypeError(f"mark_forward_method takes a method or its name, not {type(method).__name__}")
        name = method if isinstance(method, str) else method.__name__
        if name == "forward":
            raise ValueError("forward already runs through the strategy's wrapper; mark other methods only")
        if not isinstance(getattr(self._original_module, name, None), MethodType):
            raise AttributeError(f"{type(self._original_module).__name__} has no method {name!r} to mark as a forward method")
        self._forward_methods.add(name)
        fsdp = sys.modules.get("torch.distributed.fsdp")
        if fsdp is not None and isinstance(self._original_module, fsdp.FSDPModule):
            fsdp.register_fsdp_forward_method(self._original_module, name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        original = self._modules["_original_module"]
        wrapped = self._forward_module is not original
        if wrapped and name in self.__dict__["_forward_methods"]:
            return self._through_forward(name)
        attribute = getattr(original, name)
        if wrapped and inspect.ismethod(attribute):
            return _refusing_submodule_calls(attribute, original)
        return attribute

    def _through_forward(self, name: str) -> Callable[..., Any]:
        """`name` of the original module, called from inside the wrapper's forward (so DDP prepares
        the gradient sync), under the precision setting."""
        original = self._original_module

        def call(*args: Any, **kwargs: Any) -> Any:
            own_forward = original.__dict__.get("forward")

            def redirected(*inner_args: Any, **inner_kwargs: Any) -> Any:
                _restore_forward(original, own_forward)  # the method may call the real forward
                return getattr(original, name)(*inner_args, **inner_kwargs)

            original.__dict__["forward"] = redirected
            try:
                return self.forward(*args, **kwargs)
            finally:
                _restore_forward(original, own_forward)

        return call

    def __reduce__(self):
        """Pickled, it is the original module: the wrappers belong to the rank that made them."""
        return _identity, (self._original_module,)

    def __copy__(self) -> FabricModule:
        copied = type(self).__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def __deepcopy__(self, memo: dict[int, Any]) -> FabricModule:
        """A set-up model too, as Lightning's copy (an EMA or best-so-far model runs under the
        precision setting); it shares the run's precision, through which `fabric.backward` goes."""
        memo[id(self._precision)] = self._precision
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            copied.__dict__[name] = copy.deepcopy(value, memo)
        return copied


def _restore_forward(module: torch.nn.Module, own_forward: Any) -> None:
    if own_forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = own_forward


def _first_tensor(module: torch.nn.Module, floating: bool = False) -> torch.Tensor | None:
    tensors = (t for t in (*module.parameters(), *module.buffers()) if not floating or t.is_floating_point())
    return next(tensors, None)


def _refusing_submodule_calls(method: MethodType, original: torch.nn.Module) -> Callable[..., Any]:
    """`method`, raising as soon as it runs the module or a submodule outside the strategy's wrapper
    with gradients enabled."""
    name = method.__name__

    def refuse(*_: Any) -> None:
        if not torch.is_grad_enabled():
            return
        raise RuntimeError(
            f"{type(original).__name__}.{name}() runs the model outside the strategy's wrapper, so its "
            f"gradients would not be synchronised; call fabric_model.mark_forward_method({name!r}) after fabric.setup(), "
            "or call it under torch.no_grad() if it only runs inference."
        )

    @functools.wraps(method)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        handles = [module.register_forward_pre_hook(refuse) for module in original.modules()]
        try:
            return method(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    return guarded


def _forwarded(name: str) -> property:
    """An attribute read from and written to the wrapped optimizer."""
    return property(
        lambda self: getattr(self._fabric_optimizer, name),
        lambda self, value: setattr(self._fabric_optimizer, name, value),
    )


class FabricOptimizer:
    """The user's optimizer (same class for isinstance; every attribute read from it) whose step goes
    through `step_with(optimizer, **kwargs)`: the strategy's step under the precision setting. A method
    patched onto this wrapper (an LR scheduler's step counter) stays on the wrapper."""

    def __init__(self, optimizer: torch.optim.Optimizer, step_with: Callable[..., Any], after_step: Callable[..., None] | None = None):
        self.__class__ = type("Fabric" + type(optimizer).__name__, (FabricOptimizer, type(optimizer)), {})
        self._fabric_optimizer = optimizer
        self._fabric_step_with = step_with
        self._fabric_after_step = after_step

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer as the user made it."""
        return self._fabric_optimizer

    # The wrapped optimizer's own, always (class attributes of torch's Optimizer would shadow them).
    param_groups = _forwarded("param_groups")
    state = _forwarded("state")
    defaults = _forwarded("defaults")

    def __getattr__(self, name: str) -> Any:
        if "_fabric_optimizer" not in self.__dict__:  # not yet initialised (being unpickled)
            raise AttributeError(name)
        return getattr(self.__dict__["_fabric_optimizer"], name)

    def step(self, closure: Any = None) -> Any:
        """Step through the strategy under the precision setting; then `on_after_optimizer_step` fires."""
        kwargs = {} if closure is None else {"closure": closure}
        result = self._fabric_step_with(self._fabric_optimizer, **kwargs)
        if self._fabric_after_step is not None:
            self._fabric_after_step(optimizer=self._fabric_optimizer)
        return result

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state (see `optimizer_state`)."""
        return optimizer_state(self._fabric_optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the optimizer's state."""
        self._fabric_optimizer.load_state_dict(state_dict)

    def __reduce__(self):
        return _identity, (self._fabric_optimizer,)

    def __deepcopy__(self, memo: dict[int, Any]) -> FabricOptimizer:
        """A set-up optimizer too, as Lightning's copy, stepping through the same strategy."""
        copied = FabricOptimizer(copy.deepcopy(self._fabric_optimizer, memo), self._fabric_step_with, self._fabric_after_step)
        memo[id(self)] = copied
        return copied


def optimizer_state(optimizer: Any) -> dict[str, Any]:
    """An optimizer's state, as Lightning's strategies give it: that of torch's ZeroRedundancyOptimizer,
    whose ranks each hold a shard, gathered on rank 0 (a collective), which alone has it whole ({}
    on the others)."""
    if not hasattr(optimizer, "consolidate_state_dict"):
        return optimizer.state_dict()
    optimizer.consolidate_state_dict(to=0)
    return optimizer.state_dict() if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0 else {}


class FabricDataLoader:
    """Iterates the sharded loader, moving batches to the device and reshuffling every epoch."""

    def __init__(self, loader: DataLoader, device: torch.device | None, given: DataLoader | None = None):
        self._loader = loader
        self._device = device
        self._given = loader if given is None else given
        self._epoch = 0

    @property
    def loader(self) -> DataLoader:
        """The (sharded) DataLoader it iterates."""
        return self._loader

    @property
    def given(self) -> DataLoader:
        """The DataLoader given to `setup_dataloaders`, over the whole dataset."""
        return self._given

    @property
    def device(self) -> torch.device | None:
        """Where batches are moved (None: left where the loader makes them)."""
        return self._device

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[Any]:
        _set_epoch(self._loader, self._epoch)
        self._epoch += 1
        for batch in self._loader:
            yield batch if self._device is None else move_to_device(batch, self._device)

    def __getattr__(self, name: str) -> Any:
        if "_loader" not in self.__dict__:  # not yet initialised (being unpickled)
            raise AttributeError(name)
        return getattr(self.__dict__["_loader"], name)


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler, and its batch sampler's sampler, which epoch starts (reshuffles a DistributedSampler)."""
    samplers = (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    for sampler in {id(s): s for s in samplers if s is not None}.values():
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)


def _identity(obj: Any) -> Any:
    return obj


def is_wrapped(obj: Any) -> bool:
    """Whether `obj` was set up by Fabric (a module, optimizer or dataloader it returned, also compiled)."""
    return isinstance(uncompiled(obj), (FabricModule, FabricOptimizer, FabricDataLoader))


def to_cpu(data: Any) -> Any:
    """Tensors and modules moved to the CPU; Fabric wrappers replaced by the user's objects."""
    return tree_map(_leaf_on_cpu, data)


def _leaf_on_cpu(leaf: Any) -> Any:
    leaf = users_own(leaf)
    if isinstance(leaf, (torch.nn.Module, torch.optim.Optimizer)) and split_by_fsdp(leaf):
        raise ValueError(
            f"the {_users_class(leaf)} returned is held over the ranks by FSDP and cannot come back whole: "
            "return what you need of it (a value, a tensor), or fabric.save(path, {'model': model}) writes it whole"
        )
    if isinstance(leaf, torch.nn.Module):
        return leaf.cpu()
    return leaf.detach().cpu() if isinstance(leaf, torch.Tensor) else leaf


def _users_class(value: Any) -> str:
    """The name of the user's class of a module that FSDP gave a class of its own."""
    return next((cls.__name__ for cls in type(value).__mro__[1:] if not cls.__module__.startswith("torch.distributed")), type(value).__name__)


def split_by_fsdp(value: Any) -> bool:
    """Whether a module's parameters, or those an optimizer updates, are split over the ranks (FSDP's DTensors)."""
    parameters = value.parameters() if isinstance(value, torch.nn.Module) else (p for g in value.param_groups for p in g["params"])
    return any(type(parameter).__name__ == "DTensor" for parameter in parameters)


def without_wrappers(data: Any) -> Any:
    """`data` with Fabric's wrappers replaced by the user's objects, on their devices; `data` itself
    (the very object) where it holds none."""
    if all(users_own(leaf) is leaf for leaf in tree_leaves(data)):
        return data
    return tree_map(users_own, data)


def uncompiled(obj: Any) -> Any:
    """The set-up model inside `torch.compile(fabric.setup(model))`, else `obj` itself."""
    inner = getattr(obj, "_orig_mod", None) if type(obj).__name__ == "OptimizedModule" else None
    return inner if isinstance(inner, FabricModule) else obj


def users_own(obj: Any) -> Any:
    """What a set-up object comes back as from a run: the user's module or optimizer, and for a
    loader the one given to `setup_dataloaders` (a rank's shard would cover part of the data)."""
    inner = uncompiled(obj)
    return inner.given if isinstance(inner, FabricDataLoader) else unwrap(inner)


def unwrap(obj: Any) -> Any:
    """The user's own object behind a Fabric wrapper, also one compiled after `setup` (or `obj` itself)."""
    obj = uncompiled(obj)
    if isinstance(obj, FabricModule):
        return obj.module
    if isinstance(obj, FabricOptimizer):
        return obj.optimizer
    if isinstance(obj, FabricDataLoader):
        return obj.loader
    return obj
