"""The `nbfabric` command: `run` a script on N ranks, print the `env` for a bug report, `install-kernel`, `consolidate` a sharded checkpoint."""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import warnings
from importlib import metadata
from typing import Any

from nbfabric.launcher.environment import RUN_KEY_ENV, in_slurm_step, slurm_rank_environment
from nbfabric.nodes import run_node, run_script
from nbfabric.report import environment_report
from nbfabric.run_flags import RunPlan, add_run_flags, plan_run, run_command_environment
from nbfabric.user_config import CONFIG_ENV, config_path, load_defaults

RUN_DESCRIPTION = """\
Run SCRIPT on every rank, as `python SCRIPT ARGS...` would, with each line of output tagged "[rank N]".
nbfabric's run flags go before SCRIPT; those Lightning's `fabric run` has (--accelerator, --strategy,
--devices, --num-nodes, --node-rank, --main-address, --main-port, --precision) also after it, as
there. The script gets every other argument after SCRIPT, and everything after a `--`.

Settings come from the flags, else the settings file (the one %%fabric uses), else the defaults.
`Fabric()` in the script takes those given there; a `Fabric(...)` argument that says otherwise is
an error. Each rank also sees torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...), Lightning's
LT_* (as `fabric run` sets them) and Accelerate's (ACCELERATE_USE_CPU on CPU, ACCELERATE_MIXED_PRECISION
from --precision), so scripts written for torchrun or `accelerate launch` run unchanged.

Several machines: make a key once, then run the same command on each, changing only --node-rank:
  export NBFABRIC_RUN_KEY=$(python -c "import secrets; print(secrets.token_hex(16))")  # the same on every node
  nbfabric run --num-nodes=2 --node-rank=0 --main-address=10.0.0.1 --devices=8 train.py
Each node starts and supervises its own ranks, as on one node, tagging each line with the global
rank. The ranks meet through the run's store, which global rank 0 serves at --main-address:
--main-port (that address only); it admits only processes that prove they know the key. When a
rank fails, its node stops its other ranks; the other nodes stop when their next collective fails
for want of that peer.

Exit status: 0 on success; the failed rank's status (1 for an exception, 128+N for signal N);
124 after --timeout; 130 when interrupted; 2 for bad flags (nothing is started)."""

def main(argv: list[str] | None = None) -> int:
    """Entry point of `nbfabric` and `python -m nbfabric`; returns the exit status."""
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # what follows goes to the script as it is
    args = parser.parse_args(argv[:cut])
    args.passed_on = argv[cut + 1 :]
    if args.passed_on and getattr(args, "handler", None) is not _run:
        parser.error("arguments after -- are for the script of nbfabric run")
    if not hasattr(args, "handler"):
        parser.print_help()
        return 0
    return args.handler(args.parser, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbfabric", description=__doc__.split(":")[0] + ".")
    parser.add_argument("--version", action="version", version=f"nbfabric {metadata.version('nbfabric')}")
    commands = parser.add_subparsers(metavar="COMMAND")
    settings_file = argparse.ArgumentParser(add_help=False)
    settings_file.add_argument("--config", metavar="PATH", help=f"settings file (default: ${CONFIG_ENV}, else {config_path()})")
    _add_run_command(commands, settings_file)
    env = commands.add_parser("env", parents=[settings_file], help="print versions, hardware and settings for a bug report")
    env.set_defaults(handler=_env, parser=env)
    _add_install_kernel_command(commands)
    consolidate = commands.add_parser("consolidate", help="turn a sharded checkpoint directory into one file")
    consolidate.add_argument("checkpoint", help="directory written by fabric.save with FSDP(state_dict_type='sharded')")
    consolidate.add_argument("output", help="the file to write (torch.load and fabric.load read it)")
    consolidate.add_argument("--trusted", action="store_true", help="the checkpoint may hold arbitrary Python objects: load them (runs code from its files)")
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
    add_run_flags(run.add_argument)
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
    _take_run_flags_after_script(parser, args)
    if in_slurm_step() and "RANK" not in os.environ:
        return _run_as_slurm_task(parser, args)
    plan, given = _plan(parser, args)
    os.environ.update(run_command_environment(plan, given))
    return run_node(args, plan)


def _run_as_slurm_task(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Under `srun`, each task is one rank of the run (ranks, world size and main address from
    Slurm's variables): the script runs here, with the settings the flags give."""
    ranks = slurm_rank_environment(os.environ)
    args.devices = args.devices or ranks["LOCAL_WORLD_SIZE"]
    args.num_nodes = args.num_nodes or os.environ.get("SLURM_STEP_NUM_NODES", os.environ.get("SLURM_NNODES", "1"))
    plan, given = _plan(parser, args, main_address_known=True)
    os.environ.update({**ranks, **run_command_environment(plan, given)})
    if plan.place.run_key is not None:  # then the tasks meet through the keyed store (see keyed_store)
        os.environ[RUN_KEY_ENV] = plan.place.run_key
    run_script(args.script, args.script_args)
    return 0


_FABRIC_RUN_FLAGS = ("accelerator", "strategy", "devices", "num_nodes", "node_rank", "main_address", "main_port", "precision")


def _take_run_flags_after_script(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """After the script, the flags that Lightning's `fabric run` has are nbfabric's too, as there;
    nbfabric's others (--debug, --timeout ...) go to the script, as `fabric run` passes them on. A
    `--` ends them, and what follows it goes to the script as it is."""
    flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)

    def add_argument(*names: str, **options: Any) -> None:
        if options.get("dest", names[0].lstrip("-").replace("-", "_")) in _FABRIC_RUN_FLAGS:
            flags.add_argument(*names, **options)

    add_run_flags(add_argument)
    found, rest = flags.parse_known_args(args.script_args)
    for name, value in vars(found).items():
        if value is None:
            continue
        if getattr(args, name) is not None:
            parser.error(f"--{name.replace('_', '-')} is given both before and after the script; give it once")
        setattr(args, name, value)
    args.script_args = [*rest, *args.passed_on]


def _plan(parser: argparse.ArgumentParser, args: argparse.Namespace, main_address_known: bool = False) -> tuple[RunPlan, set[str]]:
    """Built-in defaults < the settings file < the flags, checked as %%fabric checks them, and
    what only a script run needs; and the names of the settings given (by the file or a flag)."""
    if not os.path.isfile(args.script):
        parser.error(f"the script {args.script!r} does not exist")
    try:
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always")
            settings = {**load_defaults(args.config), **{name: value for name, value in vars(args).items() if value is not None}}
            plan = plan_run(settings, ranks_exist=main_address_known)
    except ValueError as error:
        parser.error(str(error))
    for note in notes:  # such as a precision this accelerator runs otherwise
        print(f"nbfabric run: {note.message}", file=sys.stderr)
    if plan.config.num_nodes > 1 and not (args.main_address or main_address_known):
        parser.error(f"--num-nodes={plan.config.num_nodes} needs --main-address, the address of node 0 that every node can reach")
    return plan, set(settings)


# ----------------------------------------------------------------- env and install-kernel
def _env(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    print("\n".join(environment_report(args.config)))
    return 0


def _consolidate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from nbfabric.consolidate import consolidate

    try:
        written = consolidate(args.checkpoint, args.output, trusted=args.trusted)
    except ValueError as error:
        parser.error(str(error))
    except pickle.UnpicklingError as error:
        print(f"nbfabric consolidate: {error}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


def _install_kernel(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from nbfabric.kernel_spec import DISPLAY_NAME, install_kernel

    prefix = sys.prefix if args.sys_prefix else args.prefix
    try:
        path = install_kernel(args.name, user=prefix is None, prefix=prefix)
    except OSError as error:
        print(f"nbfabric install-kernel: cannot write the kernel spec: {error}", file=sys.stderr)
        return 1
    print(f'installed the kernel "{DISPLAY_NAME}" as {args.name!r} in {path}')
    return 0
