"""`nbfabric run`'s ranks on this node, on one node or several: started and supervised here, as a
`%%fabric` cell's are; their exit becomes the command's status."""

from __future__ import annotations

import argparse
import atexit
import os
import runpy
import sys
from functools import partial

from nbfabric.launcher import RankError, RankTimeoutError, TextSink, UnreachedCollectiveError
from nbfabric.launcher.keyed_store import keyed_rendezvous_wanted, route_env_rendezvous
from nbfabric.launcher.launchers import ForkLauncher, SpawnLauncher
from nbfabric.launcher.processes import exit_status
from nbfabric.run_flags import RunPlan


def run_node(args: argparse.Namespace, plan: RunPlan) -> int:
    """Run the script on this node's ranks; a failing rank stops the others, as do an interrupt and
    --timeout, also while they wait for the other nodes. On several nodes the ranks meet through
    the run's keyed store, which global rank 0 serves at --main-address (see keyed_store)."""
    sink = _ExitCodeSink(ranks=plan.shown_ranks)
    launcher = ForkLauncher if plan.config.start_method == "fork" else SpawnLauncher
    several = plan.config.num_nodes > 1
    try:
        launcher(plan.config, timeout=plan.timeout, sink=sink, place=plan.place, result_wanted=False).launch(partial(run_script, args.script, args.script_args))
    except RankError as error:
        print(f"nbfabric run: {error}", file=sys.stderr)
        if isinstance(error, UnreachedCollectiveError):  # its ranks were stopped: their codes say nothing
            return 1
        return exit_status(sink.returncodes.get(error.rank)) or 1  # a failure never reads as success
    except RankTimeoutError as error:
        print(f"nbfabric run: {error}", file=sys.stderr)
        return 124
    except KeyboardInterrupt:
        print(f"nbfabric run: interrupted; every rank{' of this node' if several else ''} was stopped", file=sys.stderr)
        return 130
    return 0


def run_script(script: str, args: list[str]) -> None:
    """In a rank: run `script` as `python script args...` would. With the run's key (several
    nodes), a process group the script makes itself meets through the keyed store too. When the
    script ends, or calls sys.exit() with status 0, its atexit handlers run, as at the end of an
    interpreter (Fabric's among them: it waits for the peers before leaving the process group).
    After an uncaught exception or a failing status they do not: the rank reports its failure
    and the launcher stops the others, which may be waiting for it in a collective."""
    if keyed_rendezvous_wanted():
        route_env_rendezvous()
    fresh_random_state()
    path = os.path.abspath(script)
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(path)
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exited:
        if exited.code in (None, 0):
            atexit._run_exitfuncs()
        raise
    atexit._run_exitfuncs()


def fresh_random_state() -> None:
    """Seed torch's and NumPy's global generators from fresh entropy, as a new interpreter does
    (Python's `random` is reseeded at every fork): ranks forked from this command would otherwise
    all draw the same "random" numbers, where ranks of `fabric run` or torchrun each draw their own."""
    if "torch" in sys.modules:
        sys.modules["torch"].seed()
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()


class _ExitCodeSink(TextSink):
    """Shows rank output as TextSink does and remembers how each rank exited."""

    def __init__(self, ranks: set[int] | None):
        super().__init__(ranks=ranks)
        self.returncodes: dict[int, int] = {}

    def rank_exited(self, rank: int, returncode: int) -> None:
        self.returncodes[rank] = returncode
