"""`nbfabric run` on several machines: each node's ranks started by torch.distributed.run."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

from nbfabric.launcher.machine import is_loopback, loopback_sockets, threads_per_rank
from nbfabric.launcher.errors import describe_exit
from nbfabric.launcher.launchers import MULTI_NODE_PORT
from nbfabric.launcher.processes import exit_status
from nbfabric.run_flags import RunPlan

_AGENT_GRACE_SECONDS = 10


def run_on_nodes(args: argparse.Namespace, plan: RunPlan) -> int:
    """This node's part: torch.distributed.run starts its ranks and stops them all when one fails. It runs in
    a forked child, so that an interrupt or --timeout stops it even while it waits for the other nodes."""
    os.environ["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] = "[rank ${rank}] "
    if is_loopback(plan.place.main_address):
        os.environ.update(loopback_sockets())
    os.environ["OMP_NUM_THREADS"] = str(threads_per_rank(plan.config.num_processes))
    with tempfile.TemporaryDirectory(prefix="nbfabric-") as log_dir:
        argv = torchrun_argv(args, plan, log_dir)
        agent = multiprocessing.get_context("fork").Process(target=_agent, args=(argv,), name="torchrun")
        try:
            with _stop_signals_raised():
                agent.start()
                agent.join(plan.timeout)
        except _Stopped as stopped:
            print("nbfabric run: interrupted; stopping this node's ranks", file=sys.stderr)
            _stop(agent)
            return 128 + stopped.signum
        if agent.exitcode is None:
            print(f"nbfabric run: the run did not finish within --timeout={plan.timeout:g} s; stopping this node's ranks", file=sys.stderr)
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
        print(f"nbfabric run: rank {rank} failed first on this node ({describe_exit(failure.exitcode)}); its other ranks were stopped", file=sys.stderr)
        sys.exit(exit_status(failure.exitcode))


def torchrun_argv(args: argparse.Namespace, plan: RunPlan, log_dir: str) -> list[str]:
    """torch.distributed.run's arguments for this node, with its ranks' output tagged through --tee."""
    config, place, ranks = plan.config, plan.place, plan.shown_ranks
    first = place.node_rank * config.num_processes
    shown = [rank - first for rank in range(first, first + config.num_processes) if ranks is None or rank in ranks]
    output = ["--tee=3", f"--local-ranks-filter={','.join(map(str, shown))}"] if shown else ["--redirects=3"]
    return [
        f"--nnodes={config.num_nodes}",
        f"--nproc-per-node={config.num_processes}",
        f"--node-rank={place.node_rank}",
        "--rdzv-backend=static",
        f"--master-addr={place.main_address}",
        f"--master-port={place.main_port or MULTI_NODE_PORT}",
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
