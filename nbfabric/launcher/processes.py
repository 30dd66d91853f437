"""Start rank processes by fork or by spawn, each with its own output pipes and process group."""

from __future__ import annotations

import gc
import os
import signal
import _thread
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

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
    returncode: int | None = None  # negative: killed by that signal

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


def reap_in_background(processes: list[RankProcess]) -> None:
    """Reap ranks that are already exiting, on a thread, so that the caller goes on at once. A bare
    thread: threading.Thread.start would wait until the new thread runs, while the exiting ranks
    still hold the cores."""
    if processes:
        _thread.start_new_thread(_reap_all, (processes,))


def _reap_all(processes: list[RankProcess]) -> None:
    for process in processes:
        process.reap()


def _pipes() -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    return os.pipe(), os.pipe(), os.pipe()


def fork_rank(target: Callable[[], Any] | None, spec: RankSpec, close_in_child: list[int]) -> RankProcess | None:
    """Fork one rank. With `target=None` the child returns None and goes on as the rank."""
    (out_r, out_w), (err_r, err_w), (chan_r, chan_w) = _pipes()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    gc.freeze()  # the rank's garbage collector then skips (and does not copy) the inherited objects
    pid = os.fork()
    if pid != 0:
        gc.unfreeze()
    if pid == 0:
        try:
            for fd in (*close_in_child, out_r, err_r, chan_r):
                os.close(fd)
            os.setpgid(0, 0)
            if target is None:
                _continue_as_rank(spec, (out_w, err_w, chan_w))
                return None
        except BaseException:
            os._exit(1)
        rank_main(target, spec, (out_w, err_w, chan_w))
    for fd in (out_w, err_w, chan_w):
        os.close(fd)
    try:
        os.setpgid(pid, pid)
    except (ProcessLookupError, PermissionError):
        pass
    pidfd = os.pidfd_open(pid)

    def wait() -> int:
        os.close(pidfd)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    return RankProcess(spec.rank, pid, out_r, err_r, chan_r, pidfd, wait)


def _continue_as_rank(spec: RankSpec, fds: tuple[int, int, int]) -> None:
    """In a forked child that goes on running the caller's script: report an uncaught exception."""
    channel = become_rank(spec, *fds)

    def excepthook(exc_type, exc, tb):
        report_failure(channel, spec.rank, exc)

    sys.excepthook = excepthook


def spawn_rank(target: Callable[[], Any], spec: RankSpec) -> RankProcess:
    """Start one rank in a fresh interpreter; `target` travels with dill (`multiprocess`)."""
    import multiprocess
    from multiprocess.connection import Connection

    pipes = _pipes()
    ends = [Connection(w) for _, w in pipes]
    process = multiprocess.get_context("spawn").Process(
        target=_spawned_main, args=(target, spec, ends), name=f"nbfabric-rank-{spec.rank}"
    )
    try:
        process.start()
    finally:
        for end in ends:
            end.close()
    (out_r, _), (err_r, _), (chan_r, _) = pipes

    def wait() -> int:
        process.join()
        code = process.exitcode
        process.close()
        return code

    return RankProcess(spec.rank, process.pid, out_r, err_r, chan_r, process.sentinel, wait)


def _spawned_main(target: Callable[[], Any], spec: RankSpec, ends: list) -> None:
    os.setpgid(0, 0)
    fds = tuple(os.dup(end.fileno()) for end in ends)
    for end in ends:
        end.close()
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
