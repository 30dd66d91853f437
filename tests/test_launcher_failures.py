"""When ranks fail, hang or are interrupted: one clear exception, no rank left running."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import psutil
import pytest
import torch

from nbfabric import Fabric, RankError, RankTimeoutError, launch
from nbfabric.launcher.output import Sink

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)


def _rank() -> int:
    return int(os.environ["RANK"])


def _wait_for(path, timeout: float = 60) -> None:
    """Block until another rank has created `path`: a handshake, where a sleep would guess how long
    that rank takes to get there."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other rank never created {path.name}")
        time.sleep(0.01)


def _sleep_unless(rank: int, action) -> None:
    if _rank() == rank:
        action()
    time.sleep(60)


def _raise():
    raise ValueError("bad batch 17")


def test_an_exception_names_the_rank_type_message_and_traceback(no_leaks):
    with pytest.raises(RankError) as caught:
        launch(lambda: _sleep_unless(1, _raise), nprocs=2, sink=Sink())
    error = caught.value
    assert (error.rank, error.how) == (1, "exception")
    assert "rank 1 failed: ValueError: bad batch 17" in str(error)
    assert 'raise ValueError("bad batch 17")' in error.rank_traceback
    assert error.stopped == [0]


def test_a_signal_is_named(no_leaks):
    with pytest.raises(RankError, match="rank 0 failed: killed by SIGKILL") as caught:
        launch(lambda: _sleep_unless(0, lambda: os.kill(os.getpid(), signal.SIGKILL)), nprocs=2, sink=Sink())
    assert caught.value.how == "signal"


@pytest.mark.parametrize("leave", [lambda: sys.exit(3), lambda: os._exit(3)], ids=["sys.exit", "os._exit"])
def test_an_exit_code_is_named(no_leaks, leave):
    with pytest.raises(RankError, match="rank 1 failed: exited with code 3"):
        launch(lambda: _sleep_unless(1, leave), nprocs=2, sink=Sink())


def test_exit_code_zero_from_sys_exit_is_success(no_leaks):
    assert launch(lambda: sys.exit(0), nprocs=2, sink=Sink()) is None


def test_a_rank_that_ignores_sigint_and_sigterm_is_still_stopped(no_leaks, tmp_path):
    ignoring = tmp_path / "rank 0 ignores SIGINT and SIGTERM"

    def stubborn():
        if _rank() == 0:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            ignoring.touch()
            time.sleep(60)
        _wait_for(ignoring)  # rank 1 fails only once rank 0 ignores the signals that would stop it
        raise RuntimeError("rank 1 gives up")

    with pytest.raises(RankError, match="rank 1 failed: RuntimeError") as caught:
        launch(stubborn, nprocs=2, sink=Sink())
    assert caught.value.stopped == [0]


def _collective_after_failure(failing_rank: int, in_collective):
    def train(fabric):
        if fabric.global_rank == failing_rank:
            _wait_for(in_collective)  # its peer is in the collective that this rank never joins
            raise ValueError(f"rank {failing_rank} broke")
        in_collective.touch()
        fabric.all_reduce(torch.ones(4), reduce_op="sum")
        fabric.barrier()

    return train


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_the_root_cause_is_named_not_the_broken_collective_of_its_peer(no_leaks, tmp_path, failing_rank):
    with pytest.raises(RankError) as caught:
        Fabric(accelerator="cpu", devices=2).launch(_collective_after_failure(failing_rank, tmp_path / "peer in all_reduce"))
    assert caught.value.rank == failing_rank
    assert f"ValueError: rank {failing_rank} broke" in str(caught.value)


def test_a_timeout_stops_a_hung_run(no_leaks):
    with pytest.raises(RankTimeoutError, match=r"timeout=1 s.*ranks still running at the deadline: 0, 1"):
        launch(lambda: time.sleep(60), nprocs=2, timeout=1, sink=Sink())


def test_keyboard_interrupt_stops_every_rank_and_reraises(no_leaks):
    started = threading.Event()

    class StartedSink(Sink):
        def line(self, rank, stream, text):
            started.set()

    def interrupt_when_running():
        started.wait(30)
        os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_when_running)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            launch(lambda: (print("running"), time.sleep(60)), nprocs=2, sink=StartedSink())
    finally:
        interrupter.join()


class _Lines(Sink):
    def __init__(self):
        self.lines = []

    def line(self, rank, stream, text):
        self.lines.append((rank, stream, text))


def _rank_one_leaves(fabric):
    if fabric.global_rank == 1:
        sys.exit(0)
    return 42


def test_a_rank_that_leaves_with_sys_exit_0_is_named_and_rank_zeros_value_comes_back(no_leaks):
    sink = _Lines()
    fabric = Fabric(accelerator="cpu", devices=2)
    assert fabric._launch(_rank_one_leaves, sink=sink) == 42
    assert any(rank == 1 and "left the run: sys.exit(0) at" in text and "test_launcher_failures.py" in text for rank, _, text in sink.lines)


def _rank_one_leaves_before_a_collective(fabric):
    if fabric.global_rank == 1:
        sys.exit(0)
    return fabric.all_reduce(torch.ones(1), reduce_op="sum")


def test_a_collective_that_a_rank_left_names_that_rank_as_the_cause(no_leaks):
    with pytest.raises(RankError) as caught:
        Fabric(accelerator="cpu", devices=2).launch(_rank_one_leaves_before_a_collective)
    assert caught.value.rank == 1 and caught.value.how == "left"
    assert "rank 1 failed: left the run early: sys.exit(0) at" in str(caught.value)
    assert "rank 0:" in str(caught.value)


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text for this one")


def _raise_unprintable():
    raise _Unprintable()


def test_an_exception_whose_str_fails_keeps_its_type_and_traceback(no_leaks):
    with pytest.raises(RankError) as caught:
        launch(lambda: _sleep_unless(1, _raise_unprintable), nprocs=2, sink=Sink())
    assert caught.value.how == "exception" and "rank 1 failed: _Unprintable: <its message could not be made" in str(caught.value)
    assert "raise _Unprintable()" in caught.value.rank_traceback


def _rank_1_vanishes_before_a_collective(fabric):
    if fabric.global_rank == 1:
        os._exit(0)
    fabric.all_reduce(torch.ones(1))


def _rank_0_vanishes(fabric):
    if fabric.global_rank == 0:
        os._exit(0)
    return "rank 1's value"


def test_a_rank_that_ends_with_status_0_in_the_middle_is_named_as_the_cause():
    """Its peer then fails in the collective (gloo: connection reset); the cause is the rank that left."""
    with pytest.raises(RankError) as caught:
        Fabric(accelerator="cpu", devices=2).launch(_rank_1_vanishes_before_a_collective)
    assert caught.value.rank == 1
    assert str(caught.value).startswith("rank 1 failed: ended with exit status 0 in the middle of the run, without a word (os._exit(0)")
    assert "then rank 0: RuntimeError" in str(caught.value)


def test_rank_0_ending_with_status_0_before_its_value_came_back_fails_the_run():
    """Else the run would return None as rank 0's value, with nothing said."""
    with pytest.raises(RankError, match=r"^rank 0 failed: ended with exit status 0 in the middle of the run"):
        Fabric(accelerator="cpu", devices=2).launch(_rank_0_vanishes)


def test_a_rank_that_cannot_be_forked_fails_the_launch_and_leaves_nothing(no_leaks, monkeypatch):
    """The ranks forked before it are killed and reaped, and every pipe is closed (no_leaks)."""
    real_fork, forks = os.fork, []

    def fork_once():
        if forks:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        forks.append(real_fork())
        return forks[-1]

    monkeypatch.setattr(os, "fork", fork_once)
    with pytest.raises(BlockingIOError):
        launch(lambda: time.sleep(60), nprocs=2, sink=Sink())
    assert forks and not psutil.pid_exists(forks[0])
