"""RunConfig: the validated, resolved settings of one run. Pure."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata

from nbfabric.devices import Hardware, detect_hardware
from nbfabric.tracebacks import users_stacklevel

ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
DEEPSPEED_STRATEGIES = (
    "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload",
)
STRATEGIES = ("auto", "ddp", "ddp_notebook", "ddp_fork", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", *DEEPSPEED_STRATEGIES, "single_device")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")
PRECISION_ALIASES = {
    "32": "32-true",
    32: "32-true",
    "16": "16-mixed",
    16: "16-mixed",
    "bf16": "bf16-mixed",
    "64": "64-true",
    64: "64-true",
}
START_METHODS = ("fork", "spawn")
DEEPSPEED_MIN_VERSION = (0, 19)  # the oldest release tested with forked ranks

_RESOLVED_ACCELERATORS = ("cpu", "cuda", "mps")
_RESOLVED_STRATEGIES = ("single_device", "ddp", "ddp_find_unused_parameters_true", "fsdp", *DEEPSPEED_STRATEGIES)
_REFUSED_STRATEGIES = {
    "dp": "strategy='dp' (torch's DataParallel: one process driving several GPUs) is not offered; use 'ddp', "
    "which runs one process per device and is faster",
}
_FORK_STRATEGIES = ("ddp_notebook", "ddp_fork")
_WHOLE_NUMBER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class RunConfig:
    """Resolved settings: build one with `RunConfig.resolve(...)`; direct construction takes resolved values only."""

    accelerator: str
    device_ids: tuple[int, ...]
    strategy: str
    precision: str
    num_nodes: int = 1
    start_method: str = "fork"

    def __post_init__(self) -> None:
        _check_resolved(self)

    @property
    def num_processes(self) -> int:
        """Ranks on this node."""
        return len(self.device_ids)

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_nodes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def resolve(
        cls,
        accelerator: str = "auto",
        devices: int | str | Iterable[int] = "auto",
        strategy: str = "auto",
        precision: str | int = "32-true",
        num_nodes: int | str = 1,
        start_method: str | None = None,
        hardware: Hardware | None = None,
    ) -> RunConfig:
        """Turn user-facing values (aliases, "auto", "-1", "0,2", ...) into a validated RunConfig for
        `hardware`. `start_method` None: the strategy's ("ddp_spawn"), else fork."""
        hardware = detect_hardware() if hardware is None else hardware
        accelerator = _resolve_accelerator(accelerator, hardware)
        device_ids = _resolve_devices(devices, accelerator, hardware)
        num_nodes = _parse_num_nodes(num_nodes)
        start_method = None if start_method is None else _pick("start_method", start_method, START_METHODS)
        if isinstance(strategy, str) and strategy.strip().lower() == "ddp_spawn":  # Lightning's name for ddp by spawn
            if start_method == "fork":
                raise ValueError(
                    "strategy='ddp_spawn' starts ranks with spawn, which conflicts with start_method='fork'; "
                    "use strategy='ddp' with start_method='fork', or leave start_method out."
                )
            strategy, start_method = "ddp", "spawn"
        start_method = start_method or "fork"
        strategy = _resolve_strategy(strategy, start_method, len(device_ids) * num_nodes)
        if strategy in DEEPSPEED_STRATEGIES:
            _check_deepspeed_installed()
        precision = _resolve_precision(precision, accelerator)
        return cls(accelerator, device_ids, strategy, precision, num_nodes, start_method)

    def replace(self, **changes: object) -> RunConfig:
        """A copy with some fields changed; the new values must be resolved ones, and are validated."""
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict[str, object]:
        """The settings that resolve to this configuration: devices as a count where the indices
        are 0 to N-1, else as a list of indices."""
        counted = self.device_ids == tuple(range(self.num_processes))
        return {
            "accelerator": self.accelerator,
            "devices": self.num_processes if counted else list(self.device_ids),
            "strategy": self.strategy,
            "precision": self.precision,
            "num_nodes": self.num_nodes,
            "start_method": self.start_method,
        }

    def as_flags(self) -> str:
        """The equivalent `%%fabric` flags."""
        flags = {
            "accelerator": self.accelerator,
            "devices": self.devices_flag,
            "strategy": self.strategy,
            "precision": self.precision,
        }
        if self.num_nodes != 1:
            flags["num-nodes"] = str(self.num_nodes)
        if self.start_method != "fork":
            flags["start-method"] = self.start_method
        return " ".join(f"--{name}={value}" for name, value in flags.items())

    @property
    def devices_flag(self) -> str:
        """--devices as typed: a count, or indices ("0," for the one GPU 0)."""
        devices = self.settings()["devices"]
        if isinstance(devices, int):
            return str(devices)
        indices = ",".join(str(index) for index in devices)
        return indices + "," if len(devices) == 1 else indices


def _check_resolved(config: RunConfig) -> None:
    if config.accelerator not in _RESOLVED_ACCELERATORS:
        raise ValueError(
            f"RunConfig.accelerator={config.accelerator!r} is not a resolved accelerator; choose one of "
            f"{_choices(_RESOLVED_ACCELERATORS)} (RunConfig.resolve also accepts 'auto' and 'gpu')."
        )
    ids = config.device_ids
    if not (
        isinstance(ids, tuple) and ids and all(_is_int(i) and i >= 0 for i in ids) and len(set(ids)) == len(ids)
    ):
        raise ValueError(
            f"RunConfig.device_ids={ids!r} is not valid; "
            "pass a non-empty tuple of distinct device indices, such as (0, 1)."
        )
    if config.accelerator == "cpu" and ids != tuple(range(len(ids))):
        raise ValueError(
            f"RunConfig.device_ids={ids!r} is not valid on CPU, where the ids are the ranks 0..n-1; "
            f"pass {tuple(range(len(ids)))!r}."
        )
    if not (_is_int(config.num_nodes) and config.num_nodes >= 1):
        raise ValueError(f"RunConfig.num_nodes={config.num_nodes!r} is not valid; pass a whole number, 1 or more.")
    if config.accelerator == "mps" and (ids != (0,) or config.num_nodes != 1):
        raise ValueError(
            f"accelerator='mps' runs one process on one machine, but device_ids={ids!r} "
            f"and num_nodes={config.num_nodes!r}; use device_ids=(0,) and num_nodes=1."
        )
    if config.strategy not in _RESOLVED_STRATEGIES:
        raise ValueError(
            f"RunConfig.strategy={config.strategy!r} is not a resolved strategy; choose one of "
            f"{_choices(_RESOLVED_STRATEGIES)} "
            f"(RunConfig.resolve also accepts {_choices(_FORK_STRATEGIES)} and 'auto')."
        )
    if config.strategy == "single_device" and config.distributed:
        raise ValueError(
            f"strategy='single_device' runs one process, but {config.num_processes} device(s) on "
            f"{config.num_nodes} node(s) make {config.world_size} processes; "
            "use strategy='ddp' or 'auto', or one device on one node."
        )
    if config.precision not in PRECISIONS:
        raise ValueError(
            f"RunConfig.precision={config.precision!r} is not a canonical precision; "
            f"choose one of {_choices(PRECISIONS)}."
        )
    if config.accelerator == "cpu" and config.precision == "16-mixed":
        raise ValueError("precision='16-mixed' is not available on CPU; use 'bf16-mixed'.")
    if config.accelerator == "mps" and config.precision == "64-true":
        raise ValueError("precision='64-true' is not available on MPS, which has no float64; use '32-true'.")
    if config.strategy in DEEPSPEED_STRATEGIES and (config.accelerator == "mps" or config.precision == "64-true"):
        raise ValueError(
            f"strategy={config.strategy!r} runs on CPU or CUDA in 32-true, 16-mixed, bf16-mixed, 16-true or bf16-true, "
            f"not accelerator={config.accelerator!r} with precision={config.precision!r}; choose strategy='ddp' for that."
        )
    if config.start_method not in START_METHODS:
        raise ValueError(
            f"RunConfig.start_method={config.start_method!r} is not valid; choose one of {_choices(START_METHODS)}."
        )


def _resolve_accelerator(value: object, hardware: Hardware) -> str:
    requested = _pick("accelerator", value, ACCELERATORS)
    present = hardware.accelerators()
    if requested == "auto":
        return present[0]
    if requested == "gpu":
        if present[0] == "cpu":
            raise ValueError(
                "accelerator='gpu' needs a CUDA GPU or an Apple MPS device, but no GPU was found; "
                "accelerator='cpu' works on this machine."
            )
        return present[0]
    if requested not in present:
        needs = {
            "cuda": "a CUDA GPU, but none is visible (a CPU-only torch build or CUDA_VISIBLE_DEVICES can hide GPUs)",
            "mps": "an Apple MPS device, but none was found",
        }[requested]
        raise ValueError(f"accelerator={requested!r} needs {needs}; accelerator='cpu' works on this machine.")
    return requested


def _resolve_devices(devices: object, accelerator: str, hardware: Hardware) -> tuple[int, ...]:
    requested = _parse_devices(devices)
    if accelerator == "cpu":
        if isinstance(requested, tuple):
            raise ValueError(
                f"devices={devices!r} lists GPU indices, but on CPU devices is a number of processes; "
                f"pass devices={len(requested)} instead."
            )
        if requested == "auto":
            return (0,)
        return tuple(range(hardware.cpu_count if requested == -1 else requested))

    available = hardware.cuda_count if accelerator == "cuda" else 1
    what = f"{available} CUDA GPU(s)" if accelerator == "cuda" else "1 MPS device"
    if isinstance(requested, tuple):
        for index in requested:
            if requested.count(index) > 1:
                raise ValueError(f"devices={devices!r} names device {index} twice; list each index once.")
            if index >= available:
                raise ValueError(
                    f"devices={devices!r} names device {index}, but this machine has {what} "
                    f"(indices {_choices(range(available))})."
                )
        return requested
    count = available if requested in ("auto", -1) else requested
    if count > available:
        raise ValueError(
            f"devices={devices!r} asks for {count} devices, but this machine has {what}; "
            "pass devices=-1 to use all of them."
        )
    return tuple(range(count))


def _parse_devices(devices: object) -> str | int | tuple[int, ...]:
    """'auto', -1 (all), a count of at least 1, or a tuple of indices."""
    value = devices_value(devices) if isinstance(devices, str) else devices
    if value == "auto":
        return value
    if isinstance(value, (list, tuple)) and value and all(_is_int(i) and i >= 0 for i in value):
        return tuple(value)
    if _is_int(value) and (value == -1 or value >= 1):
        return value
    raise ValueError(
        f"devices={devices!r} is not valid; pass a number of devices (1 or more), -1 for all, 'auto', "
        "or GPU indices such as [0, 2] or '0,2'."
    )


def devices_value(text: str) -> str | int | list[int]:
    """--devices text as a value: '2' -> 2, '0,2' -> [0, 2]; anything else as typed (resolve says what is wrong)."""
    text = text.strip().lower()
    if "," not in text:
        return int(text) if _WHOLE_NUMBER.fullmatch(text) else text
    entries = [entry.strip() for entry in text.split(",")]
    if entries[-1] == "":
        entries.pop()
    if entries and all(_WHOLE_NUMBER.fullmatch(entry) for entry in entries):
        return [int(entry) for entry in entries]
    return text


def _parse_num_nodes(value: object) -> int:
    number = int(value) if isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value.strip()) else value
    if _is_int(number) and number >= 1:
        return number
    raise ValueError(f"num_nodes={value!r} is not valid; pass a whole number of machines, 1 or more.")


def _resolve_strategy(value: object, start_method: str, world_size: int) -> str:
    if isinstance(value, str) and value.strip().lower() in _REFUSED_STRATEGIES:
        raise ValueError(_REFUSED_STRATEGIES[value.strip().lower()] + f"; choose one of {_choices(STRATEGIES)}.")
    requested = _pick("strategy", value, STRATEGIES)
    if requested in _FORK_STRATEGIES:
        if start_method == "spawn":
            raise ValueError(
                f"strategy={requested!r} starts ranks with fork, which conflicts with start_method='spawn'; "
                "use strategy='ddp' with start_method='spawn', or leave start_method as 'fork'."
            )
        return "ddp"
    if requested == "auto":
        return "ddp" if world_size > 1 else "single_device"
    return requested


def _check_deepspeed_installed() -> None:
    """Raise, naming the extra, where deepspeed is missing or older than the releases tested (without importing it)."""
    try:
        version = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        raise ImportError("strategy='deepspeed' needs DeepSpeed: pip install 'nbfabric[deepspeed]'") from None
    if tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) < DEEPSPEED_MIN_VERSION:
        raise ImportError(
            f"strategy='deepspeed' needs deepspeed>={'.'.join(map(str, DEEPSPEED_MIN_VERSION))} (older releases may initialise "
            f"CUDA when imported, which breaks forked ranks); this environment has {version}: pip install -U 'nbfabric[deepspeed]'"
        )


def _resolve_precision(value: object, accelerator: str) -> str:
    key = value.strip().lower() if isinstance(value, str) else value
    precision = PRECISION_ALIASES.get(key, key) if isinstance(key, str) or _is_int(key) else None
    if precision not in PRECISIONS:
        aliases = _choices(dict.fromkeys(str(alias) for alias in PRECISION_ALIASES))
        raise ValueError(
            f"precision={value!r} is not valid; choose one of {_choices(PRECISIONS)} (aliases: {aliases})."
        )
    if accelerator == "cpu" and precision == "16-mixed":
        warnings.warn(
            "precision='16-mixed' (float16 autocast) is meant for GPUs; on CPU this run uses 'bf16-mixed' instead. "
            "Pass precision='bf16-mixed' to silence this warning.",
            UserWarning,
            stacklevel=users_stacklevel(),
        )
        return "bf16-mixed"
    return precision


def _pick(name: str, value: object, choices: tuple[str, ...]) -> str:
    normal = value.strip().lower() if isinstance(value, str) else value
    if normal not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {_choices(choices)}.")
    return normal


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choices(values: Iterable[object]) -> str:
    return ", ".join(str(value) for value in values)
