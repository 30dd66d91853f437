"""Where a run's ranks come from: one small interface, an implementation per way of starting them.

A launcher takes a Fabric and a function and runs ``function(fabric, *args, **kwargs)`` on every
rank of the run, returning rank 0's value. The rank-side steps it takes are the same for all:
`Fabric._join` (who this rank is, its device and process group) before the function and
`Fabric._finish` after. A new way of starting ranks (a pool of ranks that outlive a cell)
implements `Launcher` and joins `select_launcher`; neither Fabric nor the magics change.
"""

from __future__ import annotations

import atexit
import pickle
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Protocol

from nbfabric.config import RunConfig
from nbfabric.launcher import launch
from nbfabric.launcher.cell_labels import label_error_cells
from nbfabric.launcher.environment import RankInfo, started_by_launcher
from nbfabric.launcher.output import Sink
from nbfabric.launcher.pool import active_pool
from nbfabric.launcher.shipping import dumps
from nbfabric.wrappers import to_cpu

MULTI_NODE_PORT = 29500  # node 0's rendezvous port when none is given, as torchrun's


class Launcher(Protocol):
    """Starts (or joins) the ranks of one run and runs a function on each."""

    @property
    def interactive(self) -> bool:
        """Whether it can start ranks from a notebook or a Python prompt."""

    def launch(self, fabric: Any, function: Callable[..., Any] | None, args: tuple = (), kwargs: dict | None = None) -> Any:
        """Run ``function(fabric, *args, **kwargs)`` on every rank and return rank 0's value."""


@dataclass(frozen=True)
class NodePlace:
    """Where this machine's ranks sit in a run of one or several nodes."""

    node_rank: int = 0
    main_address: str = "127.0.0.1"
    main_port: int | None = None  # a free port on one node; MULTI_NODE_PORT on several


class JoinLauncher:
    """Ranks that already exist (torchrun, `nbfabric run`, srun) or a run of one process: the
    function runs here, in this process."""

    interactive = True

    def launch(self, fabric: Any, function: Callable[..., Any] | None, args: tuple = (), kwargs: dict | None = None) -> Any:
        fabric._join(RankInfo.from_environment())
        if function is None:
            atexit.register(_leave_after_script, fabric)
            return None
        try:
            return function(fabric, *args, **(kwargs or {}))
        finally:
            fabric.strategy.release()


class ProcessLauncher:
    """New processes on this machine, one per rank, supervised until every rank has ended; their
    output and events go to `sink`."""

    start_method = ""
    interactive = True

    def __init__(self, config: RunConfig, *, timeout: float | None = None, sink: Sink | None = None, place: NodePlace = NodePlace()):
        self.config = config
        self.timeout = timeout
        self.sink = sink
        self.place = place

    def launch(self, fabric: Any, function: Callable[..., Any] | None, args: tuple = (), kwargs: dict | None = None) -> Any:
        target = None if function is None else partial(run_as_rank, fabric, function, args, kwargs or {})
        port = self.place.main_port
        if port is None and self.config.num_nodes > 1:
            port = MULTI_NODE_PORT
        try:
            return launch(
                target,
                nprocs=self.config.num_processes,
                start_method=self.start_method,
                num_nodes=self.config.num_nodes,
                node_rank=self.place.node_rank,
                main_address=self.place.main_address,
                main_port=port,
                timeout=self.timeout,
                sink=self.sink,
                wait_for_exit=self.config.accelerator != "cpu",
            )
        except BaseException as error:
            label_error_cells(error)
            raise


class SpawnLauncher(ProcessLauncher):
    """Fresh interpreters: the function and its arguments travel as a rank pool's do (cloudpickle:
    notebook functions with the globals they reach), the Fabric with dill (`multiprocess`)."""

    start_method = "spawn"

    def launch(self, fabric: Any, function: Callable[..., Any] | None, args: tuple = (), kwargs: dict | None = None) -> Any:
        if function is None:
            raise ValueError("continuing the calling script in each rank needs start_method='fork'")
        return super().launch(fabric, call_shipped, (dumps((function, args, kwargs or {})),))


class ForkLauncher(ProcessLauncher):
    """Forked from this process: fast, and each rank starts with this process's state. Without a
    function, in a script, each rank returns from `launch` and goes on with the rest of the script."""

    start_method = "fork"

    def launch(self, fabric: Any, function: Callable[..., Any] | None, args: tuple = (), kwargs: dict | None = None) -> Any:
        if function is None and _interactive():
            raise RuntimeError(
                "fabric.launch() without a function cannot start ranks in a notebook; "
                "use fabric.launch(train_fn) or a %%fabric cell."
            )
        fabric.strategy.preload()
        result = super().launch(fabric, function, args, kwargs)
        if function is None:  # only a rank gets here: it goes on with the caller's script
            JoinLauncher().launch(fabric, None)
        return result


def select_launcher(
    config: RunConfig,
    *,
    timeout: float | None = None,
    sink: Sink | None = None,
    place: NodePlace = NodePlace(),
    new_processes: bool = False,
) -> Launcher:
    """The launcher for these settings: join ranks that exist, run a single process here (unless
    `new_processes`), run on the rank pool while one is up, else start the ranks by the configured
    start method."""
    if started_by_launcher() or not (config.distributed or new_processes):
        return JoinLauncher()
    pool = active_pool()
    if pool is not None:
        from nbfabric.launcher.pool_launcher import PoolLauncher

        return PoolLauncher(pool, timeout=timeout, sink=sink)
    launcher = ForkLauncher if config.start_method == "fork" else SpawnLauncher
    return launcher(config, timeout=timeout, sink=sink, place=place)


def run_as_rank(fabric: Any, function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """In a rank a process launcher started. The process ends right after, which ends its process
    group too: a barrier keeps a rank from leaving while a peer still talks to it (destroying the
    group would do the same in about 20 ms instead of 1). That barrier fails when a peer has left
    already (sys.exit, or a failure the launcher reports for that peer); this rank's own result
    stands."""
    fabric._join(RankInfo.from_environment())
    try:
        value = function(fabric, *args, **kwargs)
        fabric._before_return()
        result = to_cpu(value)
        try:
            fabric.strategy.barrier()
        except RuntimeError:
            pass
        return result
    finally:
        fabric._finish()


def call_shipped(fabric: Any, shipped: bytes) -> Any:
    """In a rank: the function and arguments `shipping.dumps` pickled, called with `fabric`."""
    function, args, kwargs = pickle.loads(shipped)
    return function(fabric, *args, **kwargs)


def _leave_after_script(fabric: Any) -> None:
    """At the end of a script's rank, leave the process group before Python's own teardown, which
    can abort the process (SIGABRT) while a gloo group's threads still run. After an uncaught
    exception the group stays: the peers must see this rank fail as it exits, not leave early and
    then fail (which would blame them first)."""
    if getattr(sys, "last_value", None) is None:
        fabric.strategy.leave()


def _interactive() -> bool:
    return hasattr(sys, "ps1") or "ipykernel" in sys.modules
