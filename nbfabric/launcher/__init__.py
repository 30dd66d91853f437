"""Start N ranks from this process, supervise them, and return rank 0's result."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from nbfabric.config import START_METHODS
from nbfabric.launcher.environment import rank_environment
from nbfabric.launcher.fork_safety import check_fork_safe
from nbfabric.launcher.global_state import GlobalState
from nbfabric.launcher.machine import free_port, threads_per_rank
from nbfabric.launcher.errors import ForkUnsafeError, RankError, RankTimeoutError, UnreachedCollectiveError, raise_for_outcome
from nbfabric.launcher.output import Sink, TextSink
from nbfabric.launcher.shared_tensors import SharedFiles
from nbfabric.launcher.processes import EXIT_WAIT, RankProcess, fork_ranks, spawn_rank, stop_spawn_helper, wait_for_reaping
from nbfabric.launcher.supervisor import Supervisor
from nbfabric.launcher.inherited import find_inherited
from nbfabric.launcher.worker import RankSpec

__all__ = ["launch", "RankError", "RankTimeoutError", "UnreachedCollectiveError", "ForkUnsafeError", "Sink", "TextSink"]


def launch(
    target: Callable[[], Any] | None,
    *,
    nprocs: int,
    start_method: str = "fork",
    num_nodes: int = 1,
    node_rank: int = 0,
    main_address: str = "127.0.0.1",
    main_port: int | None = None,
    timeout: float | None = None,
    sink: Sink | None = None,
    wait_for_exit: bool = False,
    run_key: str | None = None,
    result_wanted: bool = True,
) -> Any:
    """Run `target()` on `nprocs` new processes and return rank 0's return value.

    It returns once every rank has finished and said so; the operating system's teardown of
    their processes goes on in the background (about 10 ms each), unless `wait_for_exit` (ranks
    that held a GPU: its memory is free when this returns) or the run failed.

    With `target=None` (fork only) the ranks return from this call and go on running the
    caller's script, while this process supervises them and never returns. `run_key`: the key of
    the store the ranks of several nodes meet through (keyed_store). Unless `result_wanted` is
    False, a rank 0 that ends with status 0 without sending its value back fails the run.
    """
    if start_method not in START_METHODS:
        raise ValueError(f"start_method={start_method!r} is not valid; choose one of {', '.join(START_METHODS)}")
    if start_method == "fork":
        check_fork_safe()
    elif target is None:
        raise ValueError("continuing the calling script in each rank needs start_method='fork'")
    specs = _rank_specs(nprocs, num_nodes, node_rank, main_address, main_port or free_port(), run_key)
    shared = SharedFiles()  # large tensors the spawned ranks are sent, and only while this run lasts
    try:
        ranks = _start(target, specs, start_method, shared)
        if ranks is None:
            return None  # this process is now a rank
        outcome = Supervisor(ranks, sink or TextSink(), timeout).run()
    finally:
        shared.remove()
        if start_method == "spawn":
            stop_spawn_helper()
    try:
        raise_for_outcome(outcome, timeout, result_wanted=result_wanted and target is not None and node_rank == 0)
    except BaseException:
        wait_for_reaping(EXIT_WAIT)  # after a failure or a stop, no rank is left when the error shows
        raise
    if wait_for_exit:
        wait_for_reaping(EXIT_WAIT)
    if target is None:
        raise SystemExit(0)
    return pickle.loads(outcome.result.payload) if outcome.result is not None else None


def _rank_specs(nprocs, num_nodes, node_rank, main_address, main_port, run_key) -> list[RankSpec]:
    threads = threads_per_rank(nprocs)
    specs = []
    for local_rank in range(nprocs):
        env = rank_environment(
            local_rank=local_rank,
            local_world_size=nprocs,
            node_rank=node_rank,
            num_nodes=num_nodes,
            main_address=main_address,
            main_port=main_port,
            threads=threads,
            run_key=run_key,
        )
        rank = int(env["RANK"])
        specs.append(
            RankSpec(rank=rank, env=env, send_result=rank == 0, threads=threads, parent_pid=os.getpid(), local_store=num_nodes == 1)
        )
    return specs


def _start(target, specs: list[RankSpec], start_method: str, shared: SharedFiles) -> list[RankProcess] | None:
    """Start every rank; if one cannot start, kill those already started. Spawned ranks start with
    interrupts deferred, and the files of `shared` are written while their interpreters start."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            # A rank would write its pending bytes out again when it drops the inherited stream. A
            # kernel's streams keep theirs in order with the rank lines written after them, and
            # their flush waits for the kernel's IO thread.
            stream.flush()
    if start_method == "fork":
        return fork_ranks(target, specs, find_inherited())
    started: list[RankProcess] = []
    state = GlobalState.capture()  # each spawned rank starts from this process's, as a forked one does
    try:
        with interrupts_deferred(), shared.placing():
            for spec in specs:
                started.append(spawn_rank(target, dataclasses.replace(spec, state=state)))
    except BaseException:
        for process in started:
            process.signal(signal.SIGKILL)
            process.reap()
            for fd in process.fds:
                if fd != process.sentinel:  # reap() closed it
                    os.close(fd)
        raise
    return started


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """An interrupt that comes inside is raised when it ends: inside multiprocess's start of a
    process, it could leave that process running with nobody to stop it; inside an import, a
    half-imported module for every later cell. Interrupts reach only the main thread; elsewhere
    this does nothing."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    came: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if came:
        signal.raise_signal(signal.SIGINT)  # to the handler it would have reached
