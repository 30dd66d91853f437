"""The `nbfabric` command: `run` a script on N ranks, print the `env` for a bug report, `install-kernel`."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import runpy
import signal
import sys
import tempfile
from contextlib import contextmanager
from functools import partial
from importlib import metadata
from typing import Any, Iterator

from nbfabric.config import ACCELERATORS, PRECISIONS, START_METHODS, STRATEGIES, RunConfig
from nbfabric.fabric import LAUNCHER_FLAGS_ENV
from nbfabric.launcher import RankError, RankTimeoutError, TextSink, launch
from nbfabric.launcher.environment import threads_per_rank
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

_TORCHRUN_PORT = 29500
_AGENT_GRACE_SECONDS = 10


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
    run.add_argument("--main-port", dest="main_port", type=int, help=f"port on node 0 (default: a free port; {_TORCHRUN_PORT} on several nodes)")
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
        return _run_on_nodes(args, config, ranks)
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
    if value == "all":
        return None
    try:
        ranks = {int(part) for part in value.split(",") if part.strip()}
    except ValueError:
        ranks = set()
    if not ranks or not all(0 <= rank < world_size for rank in ranks):
        parser.error(f"--ranks={value!r} is not valid; use all, or ranks from 0 to {world_size - 1} such as 0 or 0,1")
    return ranks


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


def exit_status(returncode: int | None) -> int:
    """A process's exit code as a shell reports it: 128+N for signal N, 1 when unknown."""
    if returncode is None:
        return 1
    return returncode if returncode >= 0 else 128 - returncode


# ----------------------------------------------------------------- several nodes
def _run_on_nodes(args: argparse.Namespace, config: RunConfig, ranks: set[int] | None) -> int:
    """This node's part: torch.distributed.run starts its ranks and stops them all when one fails. It runs in
    a forked child, so that an interrupt or --timeout stops it even while it waits for the other nodes."""
    os.environ["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] = "[rank ${rank}] "
    threads = threads_per_rank(config.num_processes)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="nbfabric-") as log_dir:
        argv = torchrun_argv(args, config, ranks, log_dir)
        agent = multiprocessing.get_context("fork").Process(target=_agent, args=(argv,), name="torchrun")
        try:
            with _stop_signals_raised():
                agent.start()
                agent.join(args.timeout)
        except _Stopped as stopped:
            print("nbfabric run: interrupted; stopping this node's ranks", file=sys.stderr)
            _stop(agent)
            return 128 + stopped.signum
        if agent.exitcode is None:
            print(f"nbfabric run: the run did not finish within --timeout={args.timeout:g} s; stopping this node's ranks", file=sys.stderr)
            _stop(agent)
            return 124
        return exit_status(agent.exitcode)


def _agent(argv: list[str]) -> None:
    """In the forked child: torch.distributed.run for this node; exits with the status of its first failed rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # ends it even while it waits for the other nodes
    try:
        torchrun(argv)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"killed by {failure.signal_name()}"
        print(f"nbfabric run: rank {rank} failed first on this node ({how}); its other ranks were stopped", file=sys.stderr)
        sys.exit(exit_status(failure.exitcode))


def torchrun_argv(args: argparse.Namespace, config: RunConfig, ranks: set[int] | None, log_dir: str) -> list[str]:
    """torch.distributed.run's arguments for this node, with its ranks' output tagged through --tee."""
    first = args.node_rank * config.num_processes
    shown = [rank - first for rank in range(first, first + config.num_processes) if ranks is None or rank in ranks]
    output = ["--tee=3", f"--local-ranks-filter={','.join(map(str, shown))}"] if shown else ["--redirects=3"]
    return [
        f"--nnodes={config.num_nodes}",
        f"--nproc-per-node={config.num_processes}",
        f"--node-rank={args.node_rank}",
        "--rdzv-backend=static",
        f"--master-addr={args.main_address}",
        f"--master-port={args.main_port or _TORCHRUN_PORT}",
        f"--log-dir={log_dir}",
        *output,
        args.script,
        *args.script_args,
    ]


class _Stopped(Exception):
    """This process received SIGINT or SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped(signum)


@contextmanager
def _stop_signals_raised() -> Iterator[None]:
    """Inside the block, SIGINT and SIGTERM raise _Stopped."""
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(agent: multiprocessing.Process) -> None:
    """SIGTERM: torch.distributed.run stops its ranks and exits; SIGKILL if it takes too long."""
    agent.terminate()
    agent.join(_AGENT_GRACE_SECONDS)
    if agent.exitcode is None:
        agent.kill()
        agent.join()


# ----------------------------------------------------------------- env and install-kernel
_REPORTED_VARIABLES = ("CUDA_", "NCCL_", "GLOO_", "PYTORCH_", "TORCH_", "NBFABRIC_", "OMP_")


def _env(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    print("\n".join(environment_report(args.config)))
    return 0


def environment_report(config_file: str | None = None) -> list[str]:
    """What a bug report needs: versions, the hardware found (CUDA left uninitialised), the settings in effect."""
    import platform

    import torch

    from nbfabric.notebook.magics import describe_hardware

    lines = [f"python: {sys.version.split()[0]} ({sys.executable})", f"platform: {platform.platform()}"]
    lines += [f"{package}: {_version(package)}" for package in ("nbfabric", "torch", "ipykernel", "ipywidgets")]
    lines.append(f"torch built for CUDA: {torch.version.cuda or 'no'}")
    lines.append(f"hardware: {describe_hardware()}")
    lines += _settings_report(config_file)
    variables = sorted(name for name in os.environ if name.startswith(_REPORTED_VARIABLES))
    lines += [f"{name}={os.environ[name]}" for name in variables]
    return lines


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _settings_report(config_file: str | None) -> list[str]:
    path = config_file or config_path()
    try:
        saved = load_defaults(path)
        flags = RunConfig.resolve(**saved).as_flags()
    except ValueError as error:
        return [f"settings file: {path}", f"settings in effect: none, the file is broken: {error}"]
    return [f"settings file: {path} ({json.dumps(saved) if saved else 'none saved'})", f"settings in effect: {flags}"]


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
