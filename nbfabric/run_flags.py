"""The run flags of `%%fabric` and `nbfabric run`, declared once; one check of them all before
anything starts; the settings `nbfabric run` hands to each rank's `Fabric()`."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from nbfabric.config import ACCELERATORS, PRECISIONS, START_METHODS, STRATEGIES, RunConfig
from nbfabric.interop import accelerate_precision
from nbfabric.launcher.environment import RUN_KEY_ENV, launched_world
from nbfabric.launcher.keyed_store import MAKE_A_KEY, check_run_key
from nbfabric.launcher.launchers import MULTI_NODE_PORT, NodePlace
from nbfabric.launcher.output import parse_rank_filter
from nbfabric.user_config import SETTING_NAMES

RUN_COMMAND_ENV = "NBFABRIC_FLAGS"  # what `nbfabric run` resolved, for `Fabric()` in the script
DEBUG_ENV = {"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}  # what --debug sets in every rank


@dataclass(frozen=True)
class RunFlag:
    """One flag: `name` is the setting (num_nodes), the flag is --num-nodes."""

    name: str
    help: str
    type: Callable[[str], Any] = str
    default: str = ""  # as the help shows it; the parsers leave a flag not given as None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


RUN_FLAGS = (
    RunFlag("devices", "number of ranks per node, or GPU indices such as 0,2", default="auto"),
    RunFlag("accelerator", ", ".join(ACCELERATORS), default="auto"),
    RunFlag("strategy", ", ".join(STRATEGIES), default="auto"),
    RunFlag("precision", ", ".join(PRECISIONS), default="32-true"),
    RunFlag("num_nodes", "number of machines", default="1"),
    RunFlag("node_rank", "this machine's index among the nodes, 0 to num-nodes - 1", type=int, default="0"),
    RunFlag("main_address", "address of node 0, which hosts the rendezvous (several nodes)"),
    RunFlag("main_port", f"port of the rendezvous on node 0 (a free port on one node, {MULTI_NODE_PORT} on several)", type=int),
    RunFlag(
        "run_key",
        f"the run's key, the same on every node (several nodes): the run's store admits only processes that know it; "
        f"make one with `{MAKE_A_KEY}`. The environment variable {RUN_KEY_ENV} is the better place, as a flag shows "
        "in the process list (and in a saved notebook)",
    ),
    RunFlag("start_method", " or ".join(START_METHODS) + " (one node only)", default="fork"),
    RunFlag("timeout", "stop every rank after this many seconds", type=float),
    RunFlag("ranks", "whose output to show: all, 0, or a list such as 0,2", default="all"),
    RunFlag(
        "debug",
        "torch.distributed's collective checks in every rank (its detail debug mode): ranks that call different "
        "collectives, or with different shapes, fail at once, naming each call, instead of hanging",
        type=bool,
    ),
)


def add_run_flags(add_argument: Callable[..., Any]) -> None:
    """Declare every run flag through `add_argument` (an argparse parser's, or a magic's)."""
    for flag in RUN_FLAGS:
        shown_default = f" (default: {flag.default})" if flag.default else ""
        if flag.type is bool:
            add_argument(flag.option, dest=flag.name, action="store_true", default=None, help=flag.help)
        else:
            add_argument(flag.option, dest=flag.name, type=flag.type, help=flag.help + shown_default)


@dataclass(frozen=True)
class RunPlan:
    """A run's checked settings: what runs, where this node sits, how long it may take, whose output shows."""

    config: RunConfig
    place: NodePlace = NodePlace()
    timeout: float | None = None
    shown_ranks: frozenset[int] | None = None  # None: all
    debug: bool = False  # torch.distributed's collective checks (DEBUG_ENV) in every rank

    @property
    def extra_flags(self) -> str:
        """The flags beyond `config.as_flags()` that differ from their defaults."""
        extra = [f"--timeout={self.timeout:g}"] if self.timeout is not None else []
        if self.debug:
            extra.append("--debug")
        if self.shown_ranks is not None:
            extra.append(f"--ranks={','.join(map(str, sorted(self.shown_ranks)))}")
        return " ".join(extra)


def plan_run(settings: dict[str, Any], *, ranks_exist: bool = False) -> RunPlan:
    """Check every run setting (None: not given); ValueError, naming the valid choices, for a bad one.
    Several nodes need the run's key (--run-key, else RUN_KEY_ENV), unless `ranks_exist` (tasks of
    srun, which meet through the keyed store only where a key is given)."""
    config = RunConfig.resolve(**{name: settings[name] for name in SETTING_NAMES if settings.get(name) is not None})
    node_rank = settings.get("node_rank")
    node_rank = 0 if node_rank is None else node_rank
    if not 0 <= node_rank < config.num_nodes:
        raise ValueError(f"--node-rank={node_rank} is not valid with --num-nodes={config.num_nodes}; choose 0 to {config.num_nodes - 1}")
    port = settings.get("main_port")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"--main-port={port} is not valid; choose a port from 1 to 65535")
    shown = parse_rank_filter(settings.get("ranks") or "all", config.world_size)
    run_key = settings.get("run_key") or os.environ.get(RUN_KEY_ENV)
    if config.num_nodes > 1 and not (ranks_exist and run_key is None):
        check_run_key(run_key, f"--num-nodes={config.num_nodes}")
    return RunPlan(
        config,
        NodePlace(node_rank, settings.get("main_address") or "127.0.0.1", port, run_key if config.num_nodes > 1 else None),
        check_timeout(settings.get("timeout")),
        None if shown is None else frozenset(shown),
        bool(settings.get("debug")),
    )


def check_timeout(value: Any) -> float | None:
    """A time limit in seconds (a number above 0, or a timedelta), or None for none."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if seconds is None:
        return None
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds) and seconds > 0:
        return float(seconds)
    shown = f"{value:g}" if isinstance(value, float) else repr(value)
    raise ValueError(f"timeout={shown} is not valid; give a number of seconds above 0, or a timedelta")


# ----------------------------------------------------------------- `nbfabric run` -> `Fabric()` in each rank
_CODE_DEFAULTS = {"accelerator": "auto", "devices": "auto", "strategy": "auto", "precision": "32-true", "num_nodes": 1, "start_method": None}


def run_command_environment(plan: RunPlan, given: set[str]) -> dict[str, str]:
    """The variables through which `nbfabric run` hands the settings `given` (by flags or the
    settings file; a script's own arguments rule the rest) to each rank's `Fabric()`: nbfabric's,
    Lightning's (as its `fabric run` sets them) and Accelerate's (as `accelerate launch` does)."""
    config = plan.config
    given = given | {"devices", "num_nodes"}  # the ranks that exist, whatever the script says (as `fabric run`)
    settings = {name: value for name, value in config.settings().items() if name in given}
    lightning = {"LT_DEVICES": str(config.num_processes), "LT_NUM_NODES": str(config.num_nodes)}
    lightning.update({f"LT_{name.upper()}": str(settings[name]) for name in ("accelerator", "strategy", "precision") if name in settings})
    accelerate = {"ACCELERATE_USE_CPU": "true"} if config.accelerator == "cpu" and config.world_size > 1 else {}
    if "precision" in settings:
        accelerate["ACCELERATE_MIXED_PRECISION"] = accelerate_precision(config.precision)
    return {RUN_COMMAND_ENV: json.dumps(settings), **lightning, **accelerate, **(DEBUG_ENV if plan.debug else {})}


def with_run_command_settings(**given: Any) -> dict[str, Any]:
    """`Fabric(...)` arguments, with what `nbfabric run` resolved filling those left at their default;
    an argument that resolves differently from the command's is an error, as with Lightning's `fabric run`."""
    flags = json.loads(os.environ.get(RUN_COMMAND_ENV, "{}"))
    if not flags:
        return given
    merged = {**given, **flags}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the comparison must not repeat resolve()'s warnings
        expected = RunConfig.resolve(**merged)
        for name, value in flags.items():
            if given[name] != _CODE_DEFAULTS[name] and not _resolves_to(expected, **{**merged, name: given[name]}):
                raise ValueError(
                    f"Fabric({name}={given[name]!r}) conflicts with `nbfabric run --{name.replace('_', '-')}={value}`; "
                    "set it in one place only."
                )
    return merged


def _resolves_to(expected: RunConfig, **settings: Any) -> bool:
    try:
        return RunConfig.resolve(**settings) == expected
    except ValueError:  # a contradiction, such as ddp_spawn with the command's fork
        return False


def with_launcher_world(settings: dict[str, Any]) -> dict[str, Any]:
    """`Fabric(...)` settings in a process that a launcher (torchrun, srun, mpirun, `nbfabric run`)
    started as one rank of a run: that run is the world. Devices default to its ranks per node and
    nodes to its node count; a setting that contradicts them is refused, naming both numbers."""
    world = launched_world()
    if world is None:
        return settings
    per_node, nodes = world
    if settings.get("devices", "auto") != "auto":
        asked = RunConfig.resolve(**{**settings, "num_nodes": 1}).num_processes
        if asked != per_node:
            raise ValueError(
                f"Fabric(devices={settings['devices']!r}) asks for {asked} rank(s) per node, but the launcher started "
                f"{per_node} per node (LOCAL_WORLD_SIZE={per_node}); leave devices out, or start {asked} per node."
            )
    if settings.get("num_nodes", 1) not in (1, nodes):
        raise ValueError(
            f"Fabric(num_nodes={settings['num_nodes']}) does not match the {nodes} node(s) the launcher started "
            f"(WORLD_SIZE={per_node * nodes} ranks, {per_node} per node); leave num_nodes out, or start {settings['num_nodes']} nodes."
        )
    return {**settings, "devices": per_node if settings.get("devices", "auto") == "auto" else settings["devices"], "num_nodes": nodes}
