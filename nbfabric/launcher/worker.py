"""The rank side of a launch: isolate the new process, run the target, report how it ended."""

from __future__ import annotations

import ctypes
import io
import logging
import os
import pickle
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from nbfabric.channel import ChannelWriter, Exiting, Failure, Left, Result, now
from nbfabric.launcher.cell_labels import place_label
from nbfabric.launcher.global_state import GlobalState
from nbfabric.launcher.inherited import Inherited, detach_from_kernel, find_inherited, keep, refuse_input
from nbfabric.launcher import stacks
from nbfabric.launcher.rank_links import RankLinks, rank_links, set_rank_links
from nbfabric.tracebacks import PACKAGE_DIR

_PR_SET_PDEATHSIG = 1
LET_GO_WAIT = 5.0  # seconds a rank that has reported its end stays at most, for the supervisor to let it go


@dataclass(frozen=True)
class RankSpec:
    """What one rank needs to know about itself."""

    rank: int
    env: dict[str, str]
    send_result: bool
    threads: int | None  # torch intra-op threads; None keeps the user's setting
    parent_pid: int
    local_store: bool = False  # the ranks meet through the supervisor's store (one machine)
    state: GlobalState | None = None  # a spawned rank's: the launching process's random states and settings


def become_rank(
    spec: RankSpec,
    stdout_fd: int,
    stderr_fd: int,
    channel_fd: int,
    stack_fd: int,
    store_fd: int | None = None,
    *,
    inherited: Inherited | None = None,
) -> ChannelWriter:
    """Turn a just-started process into rank `spec.rank`: signals, output pipes, environment.
    `inherited`: what the forking process found for it, or None to look here."""
    _die_with_parent(spec.parent_pid)
    _leave_spawn_helper()
    stacks.listen(stack_fd)
    keep(signal.signal(signal.SIGINT, signal.default_int_handler))
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
        keep(signal.signal(sig, signal.SIG_DFL))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # fork_ranks and spawn_rank blocked it
    inherited = inherited or find_inherited()
    _redirect_output(stdout_fd, stderr_fd, inherited.handlers)
    detach_from_kernel(inherited.display_publisher)
    refuse_input()
    os.environ.update(spec.env)
    if spec.threads is not None and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(spec.threads)
    channel = ChannelWriter(channel_fd)
    set_rank_links(RankLinks(channel, store_fd))
    return channel


def run_rank(target: Callable[[], Any], spec: RankSpec, channel: ChannelWriter) -> int:
    """Run `target`, send its result (rank 0) or failure, and return the exit code."""
    try:
        value = target()
        if spec.send_result:
            channel.send(Result(spec.rank, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)))
        _join_threads()
        return 0
    except SystemExit as exc:
        code = exit_code(exc)
        channel.send(Left(spec.rank, code, where_raised(exc), now()))
        return code
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a stop request must not cut the report short
        report_failure(channel, spec.rank, exc)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        _flush_output()


def _join_threads() -> None:
    """Wait for the threads the rank's code started and left running (daemon threads excepted), as
    a Python process, and a multiprocessing one, does at its end: a thread still writing a file
    finishes it. First, as Python's own end does, the hooks that let such threads end: those of
    the thread pools (concurrent.futures) that were never shut down, whose idle workers would
    otherwise wait forever."""
    for hook in reversed(getattr(threading, "_threading_atexits", [])):
        hook()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()


def report_failure(channel: ChannelWriter, rank: int, exc: BaseException) -> None:
    """Send `exc` with its traceback as plain text, so the parent can show it."""
    channel.send(Failure.from_exception(rank, exc))


def rank_main(target: Callable[[], Any], spec: RankSpec, fds: tuple[int, ...], inherited: Inherited | None = None) -> None:
    """Entry point of a forked or spawned rank; never returns."""
    code, channel = 1, None
    try:
        channel = become_rank(spec, *fds, inherited=inherited)
        code = run_rank(target, spec, channel)
    except KeyboardInterrupt:  # stopped while it was starting: nothing of nbfabric's to show
        code = 130
    except BaseException:  # noqa: BLE001 - the rank could not start: say why on its stderr
        traceback.print_exc()
    finally:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a stop request must not cut the exit short
            if channel is not None:
                _announce_exit(channel, spec.rank, code)
                _stay_until_let_go()
        finally:
            os._exit(code)  # whatever happened, this process never returns into the caller's code


def _announce_exit(channel: ChannelWriter, rank: int, code: int) -> None:
    """Send the exit code and close every pipe to the parent, which then need not wait while the
    operating system tears this process down (about 10 ms for a process that imported torch)."""
    try:
        channel.send(Exiting(rank, code))
        channel.close()
        os.close(1)
        os.close(2)
    except OSError:
        pass


def _stay_until_let_go() -> None:
    """A rank that passed the end-of-run barrier of its launcher's store (no peer needs it any more)
    stays until the launcher has every rank's report (at most LET_GO_WAIT), and then ends at the
    lowest priority: this process's teardown does not take a core from the peers still finishing,
    from the launcher taking their reports in, or from the notebook going on. A rank that ends
    otherwise goes at once: its peers may wait for it to leave."""
    links = rank_links()
    store = links.store if links is not None else None
    if store is not None and store.peers_finished:
        os.nice(19)
        store.wait_until_let_go(LET_GO_WAIT)


# looked up here, once: ctypes builds a function on its first lookup, which in each forked rank would
# copy the memory pages it writes to (~0.15 ms)
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent(parent_pid: int) -> None:
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:
        os._exit(1)


def _leave_spawn_helper() -> None:
    """A spawned rank closes its end of the spawning process's resource tracker (multiprocess's):
    the launcher, stopping the tracker, then waits for the tracker alone, not for this rank's exit.
    Should the rank use multiprocess itself, that starts a tracker of its own."""
    module = sys.modules.get("multiprocess.resource_tracker")
    tracker = getattr(module, "_resource_tracker", None)
    if tracker is None:
        return
    with tracker._lock:
        if tracker._fd is not None and tracker._pid is None:  # inherited: started by the launching process
            os.close(tracker._fd)
            tracker._fd = None


def _redirect_output(stdout_fd: int, stderr_fd: int, handlers: list[tuple[logging.StreamHandler, str]]) -> None:
    """Point fd 0/1/2, sys.std* and the console's logging handlers at /dev/null and the rank's
    pipes, unbuffered."""
    keep(sys.stdin, sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    devnull = os.open(os.devnull, os.O_RDONLY)
    for source, target in ((devnull, 0), (stdout_fd, 1), (stderr_fd, 2)):
        os.dup2(source, target)
        os.close(source)
    sys.stdin = open(0, closefd=False, encoding="utf-8")  # noqa: SIM115
    sys.stdout = sys.__stdout__ = _text_stream(1)
    sys.stderr = sys.__stderr__ = _text_stream(2)
    for handler, name in handlers:
        handler.stream = getattr(sys, name)  # not setStream: it would flush the kernel's stream from here


def _text_stream(fd: int) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace", line_buffering=True, write_through=True)


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def where_raised(exc: BaseException) -> str:
    """The user's line that raised `exc`, as "file, line N" or "Cell In[5], line N"."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [frame for frame in frames if not frame.filename.startswith(PACKAGE_DIR)] or frames
    return place_label(user[-1].filename, user[-1].lineno or 0) if user else "an unknown place"


def exit_code(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1
