"""Fully sharded data parallel (torch's FSDP2, `fully_shard`): each rank holds a shard of every parameter."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from nbfabric import checkpoint
from nbfabric.launcher.environment import preserved_environment
from nbfabric.precision import Precision
from nbfabric.strategies.ddp import DDPStrategy
from nbfabric.wrappers import split_by_fsdp

STATE_DICT_TYPES = ("full", "sharded")
_MIXED_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass(frozen=True)
class FSDP:
    """FSDP options: ``Fabric(strategy=FSDP(layers={Block}, cpu_offload=True))``.

    layers: module classes sharded as units of their own (the whole model is always one unit).
    cpu_offload: keep parameters, gradients and optimizer state on the CPU between uses.
    reshard_after_forward: free the gathered parameters after forward (less memory, more traffic).
    state_dict_type: "full" saves one file from rank 0; "sharded" saves a directory, one shard per
    rank (torch.distributed.checkpoint), loadable on any number of ranks.
    """

    layers: frozenset[type] = field(default_factory=frozenset)
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    state_dict_type: str = "full"

    def __post_init__(self):
        object.__setattr__(self, "layers", frozenset(self.layers))
        if self.state_dict_type not in STATE_DICT_TYPES:
            raise ValueError(
                f"state_dict_type={self.state_dict_type!r} is not valid; choose one of {', '.join(STATE_DICT_TYPES)}"
            )


_SHARDING = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}  # Lightning's sharding_strategy -> reshard_after_forward


class FSDPStrategy(DDPStrategy):
    """Shards modules with `fully_shard` over all ranks; checkpoints through torch.distributed.checkpoint.

    Options: an `FSDP(...)`, or Lightning's names: ``FSDPStrategy(auto_wrap_policy={Block},
    cpu_offload=True, sharding_strategy="SHARD_GRAD_OP", state_dict_type="sharded", timeout=...)``.
    """

    name = "fsdp"

    def __init__(
        self,
        options: FSDP | None = None,
        *,
        auto_wrap_policy: Any = None,
        cpu_offload: bool = False,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: str = "full",
        process_group_backend: str | None = None,
        timeout: Any = None,
        **unsupported: Any,
    ):
        if unsupported:
            raise TypeError(
                f"FSDPStrategy got {', '.join(sorted(unsupported))}; it takes auto_wrap_policy (a set of module classes), "
                "cpu_offload, sharding_strategy (FULL_SHARD or SHARD_GRAD_OP), state_dict_type, process_group_backend, timeout"
            )
        super().__init__(process_group_backend=process_group_backend, timeout=timeout)
        if options is None:
            if sharding_strategy not in _SHARDING or (auto_wrap_policy is not None and not isinstance(auto_wrap_policy, (set, frozenset, list, tuple))):
                raise ValueError(
                    f"sharding_strategy={sharding_strategy!r}, auto_wrap_policy={auto_wrap_policy!r}: choose sharding_strategy from "
                    f"{', '.join(_SHARDING)}, and auto_wrap_policy as a set of module classes"
                )
            options = FSDP(frozenset(auto_wrap_policy or ()), bool(cpu_offload), _SHARDING[sharding_strategy], state_dict_type)
        self.options = options
        self._sharded_parameters: dict[int, torch.nn.Parameter] = {}  # id(original) -> its sharded successor

    def make_precision(self) -> Precision:
        """As Lightning's FSDP precision, whose backward steps make `loss.backward()` refused."""
        return Precision(self.precision, self.device.type, strategy_backward=True)

    def preload(self) -> None:
        """FSDP and its checkpoint functions take about a second to import: once, before forking."""
        super().preload()
        with preserved_environment():
            import torch.distributed.checkpoint.state_dict  # noqa: F401
            import torch.distributed.fsdp  # noqa: F401

    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Shard `module` in place (the model inside, for a compiled one, which then runs on it);
        `fully_shard` gives it new (sharded) parameter objects."""
        target = getattr(module, "_orig_mod", module)
        originals = dict(target.named_parameters())
        sharded = self._shard(target)
        self._sharded_parameters.update({id(originals[name]): p for name, p in sharded.named_parameters()})
        return module if target is not module else sharded

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Point an optimizer made before sharding at the sharded parameters."""
        for group in optimizer.param_groups:
            group["params"] = [self._sharded_parameters.get(id(p), p) for p in group["params"]]
        return optimizer

    def _shard(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (torch.distributed.get_world_size(),))
        settings = {"mesh": mesh, "reshard_after_forward": self.options.reshard_after_forward}
        if self.precision in _MIXED_DTYPES:
            settings["mp_policy"] = MixedPrecisionPolicy(param_dtype=_MIXED_DTYPES[self.precision], reduce_dtype=torch.float32)
        if self.options.cpu_offload:
            settings["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")  # pinning needs a GPU
        for submodule in module.modules():
            if submodule is not module and type(submodule) in self.options.layers:
                fully_shard(submodule, **settings)
        return fully_shard(module, **settings)

    def resync(self, modules: list[torch.nn.Module], optimizers: list[Any]) -> None:
        """Each rank holds its own shard of the parameters and of their optimizer state: there is no
        copy to make equal."""

    def resume_module(self, module: torch.nn.Module, *, new_group: bool, after_stop: bool) -> str:
        """Each shard stays where it is (the same ranks meet again); the sharded units look up their
        process group anew, by its name in the device mesh, which the new group has taken over."""
        if not new_group:
            return ""
        from torch.distributed.fsdp import FSDPModule

        for unit in module.modules():
            group = unit._get_fsdp_state()._fsdp_param_group if isinstance(unit, FSDPModule) else None
            for info in {id(i): i for i in (getattr(group, "mesh_info", None), getattr(group, "post_forward_mesh_info", None)) if i}.values():
                try:
                    info.shard_process_group = info.mesh.get_group(info.shard_mesh_dim)
                except (KeyError, RuntimeError, ValueError) as error:
                    return f"the FSDP model set up before the stop cannot move to the new process group ({error}); set it up again with fabric.setup, or load it with fabric.load"
        return ""

    @contextmanager
    def no_backward_sync(self, module: torch.nn.Module) -> Iterator[None]:
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    def load_raw(self, target: Any, state: dict[str, Any], *, strict: bool) -> None:
        """A module takes its shard of each tensor; an optimizer of sharded parameters alone is
        refused, as Lightning refuses it: its state, by index, needs the model's names."""
        if isinstance(target, torch.optim.Optimizer) and split_by_fsdp(target):
            raise ValueError(
                "fabric.load_raw cannot load an optimizer alone under FSDP, whose parameters are sharded: "
                "load it with its model, fabric.load(path, {'model': model, 'optimizer': optimizer}) "
                "(a checkpoint of {'model': ..., 'optimizer': ...} that torch.save or fabric.save wrote)"
            )
        super().load_raw(target, state, strict=strict)

    def save(self, path: Any, state: dict[str, Any], is_global_zero: bool, filter: dict[str, Any] | None = None) -> None:
        if self.options.state_dict_type == "sharded":
            checkpoint.save_sharded(path, state, is_global_zero, self.barrier, filter)
            return
        full = checkpoint.filtered(checkpoint.distributed_state(state, full=True), filter)  # a collective: every rank takes part
        if is_global_zero:
            checkpoint.atomic_save(full, path)
        self.barrier()
