"""The `nbfabric` command: `run` a script on N ranks, print the `env` for a bug report, `install-kernel`, `consolidate` a sharded checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from functools import partial
from typing import Any

from nbfabric.config import ACCELERATORS, PRECISIONS, START_METHODS, STRATEGIES, RunConfig
from nbfabric.fabric import LAUNCHER_FLAGS_ENV
from nbfabric.launcher import RankError, RankTimeoutError, TextSink, launch
from nbfabric.launcher.output import parse_rank_filter
from nbfabric.launcher.processes import exit_status
from nbfabric.nodes import TORCHRUN_PORT, run_on_nodes
from nbfabric.report import environment_report
from nbfabric.user_config import CONFIG_ENV, SETTING_NAMES, config_path, load_defaults

RUN_DESCRIPTION = """\
Run SCRIPT on every rank, as `python SCRIPT ARGS...` would, with each line of output tagged "[rank N]".
nbfabric's flags go before SCRIPT; everything after SCRIPT is passed to the script.

Settings come from the flags, else the settings file (the one %%fabric uses), else the defaults.
`Fabric()` in the script takes them from here; a `Fabric(...)` argument that says otherwise is an error.
Each rank also sees torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...), so scripts written
for torchrun or `accelerate launch` run unchanged.

Several machines: run the same command on each, changing only --node-rank, e.g.
  nbfabric run --num-nodes=2 --node-rank=0 --main-address=10.0.0.1 --devices=8 train.py
Each node starts its ranks with torch.distributed.run, as fresh interpreters (`python -u SCRIPT`):
the nodes meet through its static rendezvous, a TCP store that node 0 hosts at --main-address:
--main-port, and its --tee tags each line with the global rank. When a rank fails, its node stops
its other ranks; the other nodes stop when their next collective fails for want of that peer.

Exit status: 0 on success; the failed rank's status (1 for an exception, 128+N for signal N);
124 after --timeout; 130 when interrupted; 2 for bad flags (nothing is started)."""

def main(argv: list[str] | None = None) -> int:
    """Entry point of `nbfabric` and `python -m nbfabric`; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    return args.handler(args.parser, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbfabric", description=__doc__.split(":")[0] + ".")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    settings_file = argparse.ArgumentParser(add_help=False)
    settings_file.add_argument("--config", metavar="PATH", help=f"settings file (default: ${CONFIG_ENV}, else {config_path()})")
    _add_run_command(commands, settings_file)
    env = commands.add_parser("env", parents=[settings_file], help="print versions, hardware and settings for a bug report")
    env.set_defaults(handler=_env, parser=env)
    _add_install_kernel_command(commands)
    consolidate = commands.add_parser("consolidate", help="turn a sharded checkpoint directory into one file")
    consolidate.add_argument("checkpoint", help="directory written by fabric.save with FSDP(state_dict_type='sharded')")
    consolidate.add_argument("output", help="the file to write (torch.load and fabric.load read it)")
    consolidate.set_defaults(handler=_consolidate, parser=consolidate)
    return parser


def _add_run_command(commands: Any, settings_file: argparse.ArgumentParser) -> None:
    run = commands.add_parser(
        "run",
        parents=[settings_file],
        help="run a script on N ranks",
        description=RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--devices", help="number of ranks per node, or GPU indices such as 0,2 (default: auto)")
    run.add_argument("--accelerator", help=f"{', '.join(ACCELERATORS)} (default: auto)")
    run.add_argument("--strategy", help=f"{', '.join(STRATEGIES)} (default: auto)")
    run.add_argument("--precision", help=f"{', '.join(PRECISIONS)} (default: 32-true)")
    run.add_argument("--num-nodes", dest="num_nodes", help="number of machines (default: 1)")
    run.add_argument("--start-method", dest="start_method", help=f"{', '.join(START_METHODS)} (default: fork; one node only)")
    run.add_argument("--timeout", type=float, help="stop every rank after this many seconds")
    run.add_argument("--ranks", default="all", help="whose output to show: all, 0, or a list such as 0,2 (default: all)")
    run.add_argument("--node-rank", dest="node_rank", type=int, default=0, help="this machine's index, 0 to num-nodes - 1")
    run.add_argument("--main-address", dest="main_address", help="address of node 0 (needed with --num-nodes > 1)")
    run.add_argument("--main-port", dest="main_port", type=int, help=f"port on node 0 (default: a free port; {TORCHRUN_PORT} on several nodes)")
    run.add_argument("script", help="the Python script to run")
    run.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    run.set_defaults(handler=_run, parser=run)


def _add_install_kernel_command(commands: Any) -> None:
    kernel = commands.add_parser("install-kernel", help='register the Jupyter kernel "Python (nbfabric)"')
    kernel.add_argument("--name", default="nbfabric", help="kernel name (default: nbfabric)")
    where = kernel.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for this user (the default)")
    where.add_argument("--sys-prefix", dest="sys_prefix", action="store_true", help=f"in this environment ({sys.prefix})")
    where.add_argument("--prefix", help="under PREFIX/share/jupyter/kernels")
    kernel.set_defaults(handler=_install_kernel, parser=kernel)


# ----------------------------------------------------------------- run
def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    config = _resolve(parser, args)
    ranks = _check_run_flags(parser, args, config)
    os.environ[LAUNCHER_FLAGS_ENV] = json.dumps(launcher_flags(config))
    if config.num_nodes > 1:
        return run_on_nodes(args, config, ranks)
    return _run_on_this_node(args, config, ranks)


def _resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RunConfig:
    """Built-in defaults < the settings file < the flags, validated as %%fabric validates them."""
    try:
        settings = load_defaults(args.config)
        settings.update({name: getattr(args, name) for name in SETTING_NAMES if getattr(args, name) is not None})
        return RunConfig.resolve(**settings)
    except ValueError as error:
        parser.error(str(error))


def _check_run_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, config: RunConfig) -> set[int] | None:
    """Check what RunConfig does not; return the ranks whose output to show (None: all)."""
    if not os.path.isfile(args.script):
        parser.error(f"the script {args.script!r} does not exist")
    if not 0 <= args.node_rank < config.num_nodes:
        parser.error(f"--node-rank={args.node_rank} is not valid with --num-nodes={config.num_nodes}; choose 0 to {config.num_nodes - 1}")
    if config.num_nodes > 1 and not args.main_address:
        parser.error(f"--num-nodes={config.num_nodes} needs --main-address, the address of node 0 that every node can reach")
    if args.main_port is not None and not 1 <= args.main_port <= 65535:
        parser.error(f"--main-port={args.main_port} is not valid; choose a port from 1 to 65535")
    if args.timeout is not None and not args.timeout > 0:
        parser.error(f"--timeout={args.timeout:g} is not valid; give a number of seconds above 0")
    return _parse_ranks(parser, args.ranks, config.world_size)


def _parse_ranks(parser: argparse.ArgumentParser, value: str, world_size: int) -> set[int] | None:
    try:
        return parse_rank_filter(value, world_size)
    except ValueError as error:
        parser.error(str(error))


def launcher_flags(config: RunConfig) -> dict[str, Any]:
    """The settings every rank's `Fabric()` takes from `nbfabric run`."""
    count = config.num_processes
    return {
        "accelerator": config.accelerator,
        "devices": count if config.device_ids == tuple(range(count)) else list(config.device_ids),
        "strategy": config.strategy,
        "precision": config.precision,
        "num_nodes": config.num_nodes,
        "start_method": config.start_method,
    }


def _run_on_this_node(args: argparse.Namespace, config: RunConfig, ranks: set[int] | None) -> int:
    sink = _ExitCodeSink(ranks=ranks)
    try:
        launch(
            partial(run_script, args.script, args.script_args),
            nprocs=config.num_processes,
            start_method=config.start_method,
            main_address=args.main_address or "127.0.0.1",
            main_port=args.main_port,
            timeout=args.timeout,
            sink=sink,
        )
    except RankError as error:
        print(f"nbfabric run: {error}", file=sys.stderr)
        return exit_status(sink.returncodes.get(error.rank)) or 1  # a failure never reads as success
    except RankTimeoutError as error:
        print(f"nbfabric run: {error}", file=sys.stderr)
        return 124
    except KeyboardInterrupt:
        print("nbfabric run: interrupted; every rank was stopped", file=sys.stderr)
        return 130
    return 0


def run_script(script: str, args: list[str]) -> None:
    """In a rank: run `script` as `python script args...` would."""
    path = os.path.abspath(script)
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(path)
    runpy.run_path(path, run_name="__main__")


class _ExitCodeSink(TextSink):
    """Shows rank output as TextSink does and remembers how each rank exited."""

    def __init__(self, ranks: set[int] | None):
        super().__init__(ranks=ranks)
        self.returncodes: dict[int, int] = {}

    def rank_exited(self, rank: int, returncode: int) -> None:
        self.returncodes[rank] = returncode


# ----------------------------------------------------------------- env and install-kernel
def _env(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    print("\n".join(environment_report(args.config)))
    return 0


def _consolidate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from nbfabric.checkpoint import consolidate

    try:
        written = consolidate(args.checkpoint, args.output)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {written}")
    return 0


def _install_kernel(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from nbfabric.kernel import DISPLAY_NAME, install_kernel

    prefix = sys.prefix if args.sys_prefix else args.prefix
    try:
        path = install_kernel(args.name, user=prefix is None, prefix=prefix)
    except OSError as error:
        print(f"nbfabric install-kernel: cannot write the kernel spec: {error}", file=sys.stderr)
        return 1
    print(f'installed the kernel "{DISPLAY_NAME}" as {args.name!r} in {path}')
    return 0
