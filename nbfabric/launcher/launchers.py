"""Where a run's ranks come from: one small interface, an implementation per way of starting them.

A launcher runs a rank's part of the run, a plain callable with no arguments, on every rank and
returns rank 0's value. It only starts processes (or finds them) and runs the callable there; what
a rank does (join the run, the user's function, hand back the value) is the callable's business
(`Fabric._run_as_rank`). `prepare` is called in the launching process before ranks are forked
from it. A rank pool (nbfabric.pool) is another implementation, handed in by whoever uses it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from nbfabric.config import RunConfig
from nbfabric.launcher import interrupts_deferred, launch
from nbfabric.launcher.cell_labels import label_error_cells
from nbfabric.launcher.environment import RUN_KEY_ENV, started_by_launcher
from nbfabric.launcher.keyed_store import check_run_key
from nbfabric.launcher.output import Sink

MULTI_NODE_PORT = 29500  # node 0's rendezvous port when none is given, as torchrun's
RankMain = Callable[[], Any]


class Launcher(Protocol):
    """Starts (or joins) the ranks of one run and runs a callable on each."""

    def launch(self, rank_main: RankMain, *, prepare: Callable[[], None] | None = None) -> Any:
        """Run ``rank_main()`` on every rank and return rank 0's value."""

    def continue_script(self, *, prepare: Callable[[], None] | None = None) -> None:
        """Make this process's script go on as every rank: return in each (or refuse, saying why)."""


@dataclass(frozen=True)
class NodePlace:
    """Where this machine's ranks sit in a run of one or several nodes."""

    node_rank: int = 0
    main_address: str = "127.0.0.1"
    main_port: int | None = None  # a free port on one node; MULTI_NODE_PORT on several
    run_key: str | None = field(default=None, repr=False)  # several nodes: else RUN_KEY_ENV (keyed_store)


class JoinLauncher:
    """Ranks that already exist (torchrun, `nbfabric run`, srun) or a run of one process: the
    callable runs here, in this process."""

    runs_here = True  # its value stays in this process: no copy to the CPU for the trip back

    def launch(self, rank_main: RankMain, *, prepare: Callable[[], None] | None = None) -> Any:
        return rank_main()

    def continue_script(self, *, prepare: Callable[[], None] | None = None) -> None:
        """This process is a rank already: nothing to start."""


class ProcessLauncher:
    """New processes on this machine, one per rank, supervised until every rank has ended; their
    output and events go to `sink`."""

    start_method = ""

    def __init__(
        self, config: RunConfig, *, timeout: float | None = None, sink: Sink | None = None, place: NodePlace = NodePlace(), result_wanted: bool = True
    ):
        self.config = config
        self.timeout = timeout
        self.sink = sink
        self.place = place
        self.result_wanted = result_wanted  # False: rank 0's value does not matter (a script's), nor its ending without one

    def launch(self, rank_main: RankMain | None, *, prepare: Callable[[], None] | None = None) -> Any:
        port = self.place.main_port
        nodes = self.config.num_nodes
        if port is None and nodes > 1:
            port = MULTI_NODE_PORT
        key = check_run_key(self.place.run_key or os.environ.get(RUN_KEY_ENV), f"num_nodes={nodes}") if nodes > 1 else None
        try:
            return launch(
                rank_main,
                nprocs=self.config.num_processes,
                start_method=self.start_method,
                num_nodes=nodes,
                node_rank=self.place.node_rank,
                main_address=self.place.main_address,
                main_port=port,
                timeout=self.timeout,
                sink=self.sink,
                wait_for_exit=self.config.accelerator != "cpu",
                run_key=key,
                result_wanted=self.result_wanted,
            )
        except BaseException as error:
            label_error_cells(error)
            raise

    def continue_script(self, *, prepare: Callable[[], None] | None = None) -> None:
        self.launch(None)  # `launch` refuses what cannot go on as the caller's script


class SpawnLauncher(ProcessLauncher):
    """Fresh interpreters: the callable travels pickled (see nbfabric.rank_call)."""

    start_method = "spawn"


class ForkLauncher(ProcessLauncher):
    """Forked from this process: fast, and each rank starts with this process's state. Without a
    callable, in a script, each rank returns from `continue_script` and goes on with the rest of the script."""

    start_method = "fork"

    def launch(self, rank_main: RankMain | None, *, prepare: Callable[[], None] | None = None) -> Any:
        if prepare is not None:
            with interrupts_deferred():  # it imports modules into this process, for good
                prepare()
        return super().launch(rank_main)

    def continue_script(self, *, prepare: Callable[[], None] | None = None) -> None:
        if _interactive():
            raise RuntimeError(
                "fabric.launch() without a function cannot start ranks in a notebook; "
                "use fabric.launch(train_fn) or a %%fabric cell."
            )
        self.launch(None, prepare=prepare)  # only a rank returns: it goes on with the caller's script


def select_launcher(
    config: RunConfig,
    *,
    timeout: float | None = None,
    sink: Sink | None = None,
    place: NodePlace = NodePlace(),
    new_processes: bool = False,
) -> Launcher:
    """The launcher for these settings: join ranks that exist, run a single process here (unless
    `new_processes`), else start the ranks by the configured start method."""
    if started_by_launcher() or not (config.distributed or new_processes):
        return JoinLauncher()
    launcher = ForkLauncher if config.start_method == "fork" else SpawnLauncher
    return launcher(config, timeout=timeout, sink=sink, place=place)


def _interactive() -> bool:
    return hasattr(sys, "ps1") or "ipykernel" in sys.modules
