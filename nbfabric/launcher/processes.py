"""Start rank processes by fork or by spawn, each with its own output pipes and process group."""

from __future__ import annotations

import _thread
import atexit
import functools
import gc
import os
import queue
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from nbfabric.launcher.inherited import Inherited
from nbfabric.launcher.stacks import StackFile
from nbfabric.launcher.worker import RankSpec, become_rank, rank_main, report_failure


@dataclass
class RankProcess:
    """The parent's handle on one rank: its pid, the read ends of its pipes, and how it ended."""

    rank: int
    pid: int
    stdout: int
    stderr: int
    channel: int
    sentinel: int  # readable once the process has exited
    _wait: Callable[[], int] = field(repr=False)
    stacks: StackFile = field(repr=False)  # where the rank writes its stack when asked (stacks.take)
    store: int | None = None  # the supervisor's end of the rank's socket to the rendezvous store
    returncode: int | None = None  # negative: killed by that signal

    @property
    def fds(self) -> list[int]:
        """Every fd of this rank the parent holds."""
        return [fd for fd in (self.stdout, self.stderr, self.channel, self.stacks.fd, self.sentinel, self.store) if fd is not None]

    def signal(self, sig: int) -> None:
        """Send `sig` to the rank's process group (its own children included)."""
        if self.returncode is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def reap(self) -> int:
        """Collect the exit status once `sentinel` is readable; kill anything the rank left behind."""
        self.returncode = self._wait()
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.returncode


def reap_in_background(processes: list[RankProcess], let_go: Sequence[int] = ()) -> None:
    """Reap ranks that are already exiting, on another thread, so that the caller goes on at once:
    first close `let_go`, the sockets whose end lets ranks that wait for it go (worker._stay_until_let_go).
    Inside `reaping_deferred`, that waits until the block ends."""
    if processes or let_go:
        done = _thread.allocate_lock()
        done.acquire()
        _reaping.append(done)
        batch = (processes, list(let_go), done)
        deferred = getattr(_deferral, "batches", None)
        if deferred is None:
            _reaper().put(batch)
        else:
            deferred.append(batch)


@contextmanager
def reaping_deferred() -> Iterator[None]:
    """The ranks of launches made inside the block (by this thread) are let go and reaped when it
    ends: their teardown then takes no core while the caller still shows their results. Waiting for
    them (`wait_for_reaping`) inside the block lets them go at once."""
    if getattr(_deferral, "batches", None) is not None:  # inside another such block
        yield
        return
    _deferral.batches = []
    try:
        yield
    finally:
        _release_deferred()
        _deferral.__dict__.pop("batches", None)


_deferral = threading.local()  # .batches: what reap_in_background holds back in this thread


def _release_deferred() -> None:
    batches = getattr(_deferral, "batches", None)
    while batches:
        _reaper().put(batches.pop(0))


@functools.cache
def _reaper() -> queue.SimpleQueue:
    """The queue of the thread that reaps, started at the first use: starting a thread for every
    launch would cost each launch that start, while its exiting ranks hold the cores. A bare thread:
    threading.Thread.start would wait until the new thread runs."""
    work: queue.SimpleQueue = queue.SimpleQueue()
    _thread.start_new_thread(_reap_forever, (work,))
    return work


def _reap_forever(work: queue.SimpleQueue) -> None:
    while True:
        _reap_all(*work.get())


def _forget_the_reaper() -> None:
    """In a forked child, which has neither the reaping thread nor the ranks it reaps."""
    _reaper.cache_clear()
    _reaping.clear()
    _deferral.__dict__.clear()


os.register_at_fork(after_in_child=_forget_the_reaper)


EXIT_WAIT = 10.0  # seconds to wait for ranks that announced their exit to be gone


@functools.cache
def _reap_before_multiprocess_exits() -> None:
    """At this process's exit, multiprocess joins the spawned ranks it still counts as its own;
    one that a background reaper waits for at the same time would be waited for twice (an error
    at exit). Registered (once) after multiprocess's own handler, so that it runs first."""
    atexit.register(wait_for_reaping, EXIT_WAIT)


def wait_for_reaping(timeout: float) -> bool:
    """Wait until the ranks handed to `reap_in_background` are gone; False if some are not yet."""
    _release_deferred()
    deadline = time.monotonic() + timeout
    for done in list(_reaping):
        if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        done.release()
    return True


_reaping: list[Any] = []  # a lock per reaping thread, held until it has reaped its ranks


def _reap_all(processes: list[RankProcess], let_go: list[int], done: Any) -> None:
    try:
        for fd in let_go:
            os.close(fd)
        for process in processes:
            process.reap()
    finally:
        _reaping.remove(done)
        done.release()


def _links(spec: RankSpec) -> tuple[list[tuple[int, int]], StackFile]:
    """(parent's end, rank's end) of the stdout, stderr and event pipes, of the rank's stack file,
    and of the store's socket; and the parent's stack file."""
    stacks = StackFile()
    links = [os.pipe(), os.pipe(), os.pipe(), (stacks.fd, os.dup(stacks.fd))]
    if spec.local_store:
        links.append(tuple(end.detach() for end in socket.socketpair()))
    return links, stacks


def _process(spec: RankSpec, pid: int, parent_ends: list[int], sentinel: int, wait: Callable[[], int], stacks: StackFile) -> RankProcess:
    stdout, stderr, channel, _, *store = parent_ends
    return RankProcess(spec.rank, pid, stdout, stderr, channel, sentinel, wait, stacks, *store)


def fork_ranks(target: Callable[[], Any] | None, specs: list[RankSpec], inherited: Inherited) -> list[RankProcess] | None:
    """Fork one process per rank, back to back: the parent's bookkeeping waits until every rank is
    forked, and each rank waits at a gate until then, so that the last starts sooner (a rank at
    work, copying the pages it writes to, slows the forks still to come by a third). With
    `target=None` each child returns None and goes on as its rank. `inherited`: what the caller
    found with `find_inherited()`. If a fork fails, the ranks forked before it are killed."""
    links = [_links(spec) for spec in specs]
    gate = os.pipe()  # a byte per rank once the parent has forked every rank
    every_fd = [*gate, *(fd for pairs, _ in links for pair in pairs for fd in pair)]
    pids: list[int] = []
    child = False
    gc.freeze()  # the ranks' garbage collectors then skip (and do not copy) the inherited objects
    # SIGINT stays blocked in a child until it has its own handlers (become_rank): an interrupt
    # before that must not raise into the caller's code, which the child would then go on running.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        for spec, (pairs, _) in zip(specs, links):
            pid = os.fork()
            if pid == 0:
                child = True
                rank_ends = tuple(rank_end for _, rank_end in pairs)
                _become_forked_rank(target, spec, rank_ends, [fd for fd in every_fd if fd not in rank_ends], inherited, gate[0])
                return None  # target=None: this process goes on as the rank
            pids.append(pid)
        # a byte each, not the end of file: a rank of another launch forked meanwhile (from another
        # thread) holds the writing end too
        os.write(gate[1], b"." * len(pids))
        for fd in gate:
            os.close(fd)
        every_fd = every_fd[2:]
        return [_forked(spec, pid, pairs, stacks) for spec, pid, (pairs, stacks) in zip(specs, pids, links)]
    except BaseException:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for fd in every_fd:
            try:
                os.close(fd)
            except OSError:  # a rank's end, closed already
                pass
        raise
    finally:
        if not child:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            gc.unfreeze()


def _become_forked_rank(
    target: Callable[[], Any] | None, spec: RankSpec, rank_ends: tuple[int, ...], others: list[int], inherited: Inherited, gate: int
) -> None:
    """In a just-forked child: close the fds of the parent and of the other ranks (the gate's
    writing end among them), take a process group of its own, wait at the gate until every rank is
    forked (its byte comes), and run `target` as the rank (never returns), or, without one, become the rank and return."""
    try:
        for fd in others:
            if fd != gate:
                os.close(fd)
        os.setpgid(0, 0)
        os.read(gate, 1)  # its byte, or the end of file if the parent died first
        os.close(gate)
        if target is None:
            _continue_as_rank(spec, rank_ends, inherited)
            return
        rank_main(target, spec, rank_ends, inherited)  # never returns
    except BaseException:
        os._exit(1)
    finally:
        if target is not None:
            os._exit(1)


def _forked(spec: RankSpec, pid: int, pairs: list[tuple[int, int]], stacks: StackFile) -> RankProcess:
    """The parent's handle on a forked rank."""
    for _, rank_end in pairs:
        os.close(rank_end)
    try:
        os.setpgid(pid, pid)
    except (ProcessLookupError, PermissionError):
        pass
    pidfd = os.pidfd_open(pid)

    def wait() -> int:
        os.close(pidfd)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    return _process(spec, pid, [parent_end for parent_end, _ in pairs], pidfd, wait, stacks)


def _continue_as_rank(spec: RankSpec, fds: tuple[int, ...], inherited: Inherited) -> None:
    """In a forked child that goes on running the caller's script: report an uncaught exception."""
    channel = become_rank(spec, *fds, inherited=inherited)

    def excepthook(exc_type, exc, tb):
        report_failure(channel, spec.rank, exc)

    sys.excepthook = excepthook


def spawn_rank(target: Callable[[], Any], spec: RankSpec) -> RankProcess:
    """Start one rank in a fresh interpreter; `target` travels with dill (`multiprocess`)."""
    import multiprocess
    from multiprocess import resource_tracker
    from multiprocess.connection import Connection

    _reap_before_multiprocess_exits()

    links, stacks = _links(spec)
    ends = [Connection(rank_end) for _, rank_end in links]
    process = multiprocess.get_context("spawn").Process(
        target=_spawned_main, args=(target, spec, ends), name=f"nbfabric-rank-{spec.rank}"
    )
    # SIGINT is blocked in the new interpreter (the mask survives exec) until it has its own handlers
    # (become_rank): the notebook's interrupt reaches the kernel's process group, and an interpreter
    # still importing would print the KeyboardInterrupt's traceback into the cell.
    resource_tracker.ensure_running()  # starting it would unblock SIGINT here
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for end in ends:
            end.close()
    parent_ends = [parent_end for parent_end, _ in links]

    def wait() -> int:
        process.join()
        code = process.exitcode
        process.close()
        return code

    return _process(spec, process.pid, parent_ends, process.sentinel, wait, stacks)


def _spawned_main(target: Callable[[], Any], spec: RankSpec, ends: list) -> None:
    os.setpgid(0, 0)
    fds = tuple(os.dup(end.fileno()) for end in ends)
    for end in ends:
        end.close()
    if spec.state is not None:
        spec.state.restore()
    rank_main(target, spec, fds)


def stop_spawn_helper() -> None:
    """Stop the resource-tracker process that spawning started, so a launch leaves no process behind."""
    tracker = sys.modules.get("multiprocess.resource_tracker")
    stop = getattr(getattr(tracker, "_resource_tracker", None), "_stop", None)
    if stop is not None:
        stop()


def exit_status(returncode: int | None) -> int:
    """A process's exit code as a shell reports it: 128+N for signal N, 1 when unknown."""
    if returncode is None:
        return 1
    return returncode if returncode >= 0 else 128 - returncode
