"""Save and load checkpoints: written atomically, read with `weights_only` by default; one file
(full state) or a directory of shards (torch.distributed.checkpoint) that loads on any number of ranks.
No load runs code from a file unless the caller says it is trusted (`weights_only=False`): a sharded
checkpoint's metadata is read with an unpickler that builds only checkpoint-metadata types."""

from __future__ import annotations

import enum
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from nbfabric.wrappers import optimizer_state, split_by_fsdp, unwrap

EXTRAS_FILE = "extras.pt"  # in a sharded checkpoint: everything that is not a module or optimizer


def check_filter(filter: Any, state: dict[str, Any]) -> None:
    """`fabric.save(filter=...)`: a dict from keys of `state` to callables (name, value) -> keep."""
    if filter is None:
        return
    if not isinstance(filter, dict):
        raise TypeError(f"save(filter=...) takes a dict from state keys to callables, not {filter!r}")
    unknown = set(filter) - set(state)
    if unknown:
        raise ValueError(f"save(filter=...) names {', '.join(map(repr, sorted(unknown)))}, which the state has not; it has {', '.join(map(repr, state))}")
    for key, keep in filter.items():
        if not callable(keep):
            raise TypeError(f"save(filter=...) for {key!r} must be a callable (name, value) -> bool, not {keep!r}")


def filtered(converted: dict[str, Any], filter: dict[str, Any] | None) -> dict[str, Any]:
    """Each entry named in `filter` keeps the items of its state for which the callable says True;
    one that keeps none is left out, as Lightning leaves it."""
    for key, keep in (filter or {}).items():
        if isinstance(converted.get(key), dict):
            kept = {name: value for name, value in converted[key].items() if keep(name, value)}
            if kept:
                converted[key] = kept
            else:
                del converted[key]
    return converted


def stateful(value: Any) -> bool:
    """Whether `value` is saved as its `state_dict()` and loaded in place: it has both methods, as
    Lightning's `_Stateful` (an object with `state_dict()` alone is saved as itself)."""
    return hasattr(value, "state_dict") and hasattr(value, "load_state_dict")


def to_state(state: dict[str, Any]) -> dict[str, Any]:
    """Modules, optimizers and other stateful objects replaced by their state."""
    converted = {}
    for key, value in state.items():
        converted[key] = _state_of(unwrap(value))
    return converted


def _state_of(value: Any) -> Any:
    if isinstance(value, torch.optim.Optimizer):
        return optimizer_state(value)
    return value.state_dict() if stateful(value) else value


def distributed_state(state: dict[str, Any], *, full: bool) -> dict[str, Any]:
    """Like `to_state`, through torch.distributed.checkpoint's state-dict functions, which also
    understand sharded modules: full tensors on the CPU (`full=True`, a collective) or local shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=full, cpu_offload=full)
    modules = _modules(state)
    converted = {}
    for key, value in state.items():
        value = unwrap(value)
        if isinstance(value, torch.nn.Module):
            converted[key] = get_model_state_dict(value, options=options)
        elif isinstance(value, torch.optim.Optimizer):
            converted[key] = get_optimizer_state_dict(_owner(value, modules), value, options=options)
        else:
            converted[key] = value.state_dict() if stateful(value) else value
    return converted


def resolve(path: str | os.PathLike) -> Path | str:
    """A checkpoint's path as Lightning's (fsspec) takes it: a local Path, `~` expanded and a
    `file://` URL as its path; another URL (`s3://...`, `memory://...`) as it is, written and read
    through fsspec (its filesystem's package must be installed, such as s3fs)."""
    text = os.fsdecode(os.fspath(path))
    protocol, separator, rest = text.partition("://")
    if separator and protocol not in ("file", "local"):
        return text
    return Path(rest if separator else text).expanduser()


def atomic_save(obj: Any, path: Path | str) -> None:
    """Write to a temporary file beside `path`, then rename: `path` is never half-written (a URL:
    written by fsspec, as its filesystem writes files)."""
    if isinstance(path, str):
        import fsspec

        with fsspec.open(path, "wb") as file:
            torch.save(obj, file)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def save_sharded(
    path: str | os.PathLike, state: dict[str, Any], is_global_zero: bool, barrier: Callable[[], None], filter: dict[str, Any] | None = None
) -> None:
    """Every rank writes its shards into a temporary directory; rank 0 then puts it in place of `path`."""
    import torch.distributed.checkpoint as dcp

    objects, extras = _split(state)

    def write(directory: Path) -> None:
        dcp.save(filtered(distributed_state(objects, full=False), filter), checkpoint_id=directory)
        if is_global_zero:
            torch.save(filtered(to_state(extras), filter), directory / EXTRAS_FILE)

    replace_directory(path, write, is_global_zero, barrier)


def replace_directory(path: Path | str, write: Callable[[Path], None], is_global_zero: bool, barrier: Callable[[], None]) -> None:
    """Every rank calls `write(directory)` on a fresh temporary directory beside `path`; once all
    have, rank 0 moves the old `path` aside, the new one in, and removes the old: `path` is never
    half-written."""
    if isinstance(path, str):
        raise ValueError(f"{path!r}: a checkpoint that every rank writes a part of goes to a local (or mounted) directory, not a URL")
    partial = path.with_name(f".{path.name}.partial")
    if is_global_zero:
        recover_replaced(path)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    write(partial)
    barrier()
    if is_global_zero:
        previous = path.with_name(f".{path.name}.previous")
        if path.exists():
            os.replace(path, previous)
        os.replace(partial, path)
        shutil.rmtree(previous, ignore_errors=True)
    barrier()


def recover_replaced(path: Path) -> None:
    """A sharded save stopped between moving the old checkpoint aside and moving the new one in
    leaves only `.NAME.previous`: put it back. One stopped after moving the new one in leaves
    both: the previous one is stale, and goes."""
    previous = path.with_name(f".{path.name}.previous")
    if previous.is_dir() and not path.exists():
        os.replace(previous, path)
    elif previous.is_dir():
        shutil.rmtree(previous)


def read(path: Path | str, *, weights_only: bool | None) -> Any:
    """What `torch.save` wrote to the file `path` (a URL: read through fsspec), on the CPU;
    `weights_only=None` is torch's default (weights only, unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)."""
    if isinstance(path, str):
        import fsspec

        with fsspec.open(path, "rb") as file:
            return torch.load(file, map_location="cpu", weights_only=weights_only)
    return torch.load(path, map_location="cpu", weights_only=weights_only)


def load_into(path: Path | str, state: dict[str, Any] | None, *, strict: bool, weights_only: bool | None) -> dict[str, Any]:
    """Load `path` (a URL: through fsspec); restore each object in `state` in place and return
    what the checkpoint had besides."""
    if isinstance(path, Path) and not path.exists():
        recover_replaced(path)
    if isinstance(path, Path) and path.is_dir():
        if not (path / ".metadata").exists():
            from nbfabric.strategies.deepspeed_checkpoint import is_checkpoint

            if is_checkpoint(path):
                raise ValueError(
                    f"{os.fspath(path)!r} was written under DeepSpeed: load it with a DeepSpeed strategy, "
                    "or make one file of it with `nbfabric consolidate`"
                )
            raise ValueError(f"{os.fspath(path)!r} is a directory, not a checkpoint that fabric.save wrote")
        if not any(isinstance(unwrap(value), torch.nn.Module) for value in (state or {}).values()):
            raise ValueError(
                f"{os.fspath(path)!r} is a sharded checkpoint: loading it needs the model it goes into, "
                "as fabric.load(path, {'model': model, ...}) (its shards cannot come back as values); "
                "`nbfabric consolidate` makes one file of it"
            )
        return _load_sharded(path, state, strict=strict, weights_only=weights_only)
    checkpoint = read(path, weights_only=weights_only)
    if state is None:
        return checkpoint
    _check_keys(path, state, checkpoint, strict)
    modules = _modules(state)
    for key in [key for key in state if key in checkpoint]:
        target = unwrap(state[key])
        if isinstance(target, torch.nn.Module):
            load_module(target, checkpoint.pop(key), strict=strict)
        elif isinstance(target, torch.optim.Optimizer) and (_keyed_by_name(checkpoint[key]) or split_by_fsdp(target)):
            load_optimizer(target, checkpoint.pop(key), _owner(target, modules))
        elif stateful(target):
            target.load_state_dict(checkpoint.pop(key))
        else:
            state[key] = checkpoint.pop(key)
    return checkpoint


def load_module(module: torch.nn.Module, state_dict: dict[str, Any], *, strict: bool) -> None:
    """A whole state dict into `module`: through its own load_state_dict (and its hooks), as
    Lightning loads it; a sharded module (FSDP's) takes its shard of each tensor."""
    if not split_by_fsdp(module):
        module.load_state_dict(state_dict, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    check_strict(module, state_dict, strict)
    set_model_state_dict(module, state_dict, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any], owner: torch.nn.Module) -> None:
    """A whole optimizer state, keyed by parameter name or (as torch saves it) by index, into an
    optimizer of `owner`'s parameters, which may be sharded: each takes its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not _keyed_by_name(state):
        state = _by_name(optimizer, owner, state)
    set_optimizer_state_dict(owner, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _by_name(optimizer: torch.optim.Optimizer, owner: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by index (the order of the optimizer's parameters), keyed by the
    parameters' names in `owner` instead."""
    names = {id(parameter): name for name, parameter in owner.named_parameters()}
    ordered = [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
    return {
        "state": {ordered[index]: value for index, value in state["state"].items()},
        "param_groups": [{**group, "params": [ordered[index] for index in group["params"]]} for group in state["param_groups"]],
    }


def _load_sharded(path: Path, state: dict[str, Any], *, strict: bool, weights_only: bool | None) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    objects, extras = _split(state)
    if objects:
        loaded = distributed_state(objects, full=False)
        try:
            dcp.load(
                loaded,
                storage_reader=shard_reader(path, trusted=weights_only is False),
                planner=DefaultLoadPlanner(allow_partial_load=not strict),
                no_dist=not torch.distributed.is_initialized(),
            )
        except dcp.api.CheckpointException as error:  # a BaseException, holding each rank's error with its traceback
            cause = next((failure[0] for failure in error.failures.values() if isinstance(failure, tuple)), error)
            raise RuntimeError(
                f"the sharded checkpoint {os.fspath(path)!r} does not fit the state given: {type(cause).__name__}: {cause}"
                + ("; pass strict=False to load what it has" if strict else "")
            ) from None
        modules = _modules(objects)
        for key, target in ((key, unwrap(value)) for key, value in objects.items()):
            if isinstance(target, torch.nn.Module):
                set_model_state_dict(target, loaded[key], options=StateDictOptions(strict=strict))
            else:
                set_optimizer_state_dict(_owner(target, modules), target, loaded[key])
    return restore_entries(path, state, list(extras), torch.load(path / EXTRAS_FILE, map_location="cpu", weights_only=weights_only), strict=strict)


def restore_entries(path: Any, state: dict[str, Any], keys: list[str], available: dict[str, Any], *, strict: bool) -> dict[str, Any]:
    """Restore each of `keys` of `state` from `available` (in place where the object has
    `load_state_dict`, else the value itself); return what `available` holds besides."""
    _check_keys(path, keys, available, strict)
    for key in [key for key in keys if key in available]:
        target = unwrap(state[key])
        if stateful(target):
            target.load_state_dict(available.pop(key))
        else:
            state[key] = available.pop(key)
    return available


def check_strict(module: torch.nn.Module, state_dict: dict[str, Any], strict: bool) -> None:
    """With `strict`, keys of the module that `state_dict` lacks, or has in excess, are an error, as in `load_state_dict`."""
    expected = module.state_dict().keys()
    missing, unexpected = [k for k in expected if k not in state_dict], [k for k in state_dict if k not in expected]
    if strict and (missing or unexpected):
        problems = [f"Missing key(s) in state_dict: {', '.join(map(repr, missing))}."] if missing else []
        problems += [f"Unexpected key(s) in state_dict: {', '.join(map(repr, unexpected))}."] if unexpected else []
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(module).__name__}: {' '.join(problems)} "
            "Pass strict=False to load what the checkpoint has."
        )


def _split(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Modules and optimizers (saved as shards), and everything else."""
    objects = {k: v for k, v in state.items() if isinstance(unwrap(v), (torch.nn.Module, torch.optim.Optimizer))}
    return objects, {k: v for k, v in state.items() if k not in objects}


def _check_keys(path: Any, wanted: Any, available: dict[str, Any], strict: bool) -> None:
    missing = [key for key in wanted if key not in available]
    if strict and missing:
        raise KeyError(
            f"the checkpoint {os.fspath(path)!r} has no entry for {', '.join(map(repr, missing))}; "
            f"it has {', '.join(map(repr, available))}. Pass strict=False to load what is there."
        )


def _modules(state: dict[str, Any]) -> list[torch.nn.Module]:
    return [unwrap(v) for v in state.values() if isinstance(unwrap(v), torch.nn.Module)]


def _owner(optimizer: torch.optim.Optimizer, modules: list[torch.nn.Module]) -> torch.nn.Module:
    """The module whose parameters the optimizer updates."""
    first = next(p for group in optimizer.param_groups for p in group["params"])
    for module in modules:
        if any(p is first for p in module.parameters()):
            return module
    raise ValueError("an optimizer in the checkpoint state needs its model in the same state dict")


def _keyed_by_name(optimizer_state: Any) -> bool:
    """Optimizer state saved by parameter name (sharded-model format) rather than by index."""
    return isinstance(optimizer_state, dict) and any(isinstance(k, str) for k in optimizer_state.get("state", {}))


def shard_reader(path: Path, *, trusted: bool) -> Any:
    """torch.distributed.checkpoint's file reader for `path`; unless `trusted`, its metadata is read
    with `MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    if trusted:
        return FileSystemReader(path)

    with open(Path(path) / ".metadata", "rb") as file:
        metadata = MetadataUnpickler(file).load()  # here, so that a refusal is not wrapped in a CheckpointException

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


_PLAIN_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
}


def enum_member(cls: Any, name: str) -> Any:
    """`getattr` as pickles of enum members use it (`getattr(Color, "RED")`), and for nothing else:
    an unpickler that allows it cannot reach any other attribute through it."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and name in cls.__members__:
        return cls.__members__[name]
    raise pickle.UnpicklingError(f"the file asks for getattr({cls!r}, {name!r}), which is no enum member; it is not loaded")


class MetadataUnpickler(pickle.Unpickler):
    """Builds what a sharded checkpoint's metadata holds (the dataclasses of
    torch.distributed.checkpoint.metadata, sizes, dtypes, paths) and refuses any other global,
    which could run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN_GLOBALS:
            return super().find_class(module, name)
        if module in ("torch", "torch.distributed.checkpoint.metadata") and not name.startswith("_"):
            found = super().find_class(module, name)
            if isinstance(found, torch.dtype) or (module != "torch" and isinstance(found, type)):
                return found
        if (module, name) == ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"):
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):  # how some Pythons (3.11.2) pickle an enum member
            return enum_member
        raise pickle.UnpicklingError(
            f"the checkpoint's metadata asks for {module}.{name}, which checkpoint metadata never holds, "
            "so it is not loaded (it could run code). Load with weights_only=False only if you trust the file."
        )
