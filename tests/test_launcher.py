"""The launcher with real processes: output, results, environment, start methods, leaks."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import nbfabric
from nbfabric import Fabric, ForkUnsafeError, launch
from nbfabric.launcher.output import Sink
from nbfabric.launcher.processes import reaping_deferred, wait_for_reaping
from nbfabric.launcher.worker import LET_GO_WAIT

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)


class RecordingSink(Sink):
    def __init__(self):
        self.lines: list[tuple[int, str, str]] = []
        self.exits: dict[int, int] = {}

    def line(self, rank, stream, text):
        self.lines.append((rank, stream, text))

    def rank_exited(self, rank, returncode):
        self.exits[rank] = returncode

    def texts(self, rank, stream="stdout"):
        return [text for r, s, text in self.lines if r == rank and s == stream]


def _rank() -> int:
    return int(os.environ["RANK"])


def test_output_is_tagged_by_rank_and_stream_including_fd_level_writes(no_leaks):
    def target():
        print(f"print from {_rank()}")
        print(f"error from {_rank()}", file=sys.stderr)
        os.write(1, f"fd write from {_rank()}\n".encode())
        for i in range(3):
            print(f"line {i}")

    sink = RecordingSink()
    launch(target, nprocs=2, sink=sink)
    for rank in (0, 1):
        assert sink.texts(rank) == [f"print from {rank}", f"fd write from {rank}", "line 0", "line 1", "line 2"]
        assert sink.texts(rank, "stderr") == [f"error from {rank}"]
    assert sink.exits == {0: 0, 1: 0}


def test_logging_handlers_of_the_console_write_to_each_ranks_streams(no_leaks):
    """Handlers made on this process's stdout or stderr (logging.basicConfig in a notebook), also
    those of a logger that logging's registry does not list, write each rank's records into its
    own tagged output."""
    named = logging.getLogger("nbfabric-test-console")
    unlisted = logging.Logger("nbfabric-test-unlisted")
    handlers = [(named, logging.StreamHandler(sys.stderr)), (unlisted, logging.StreamHandler(sys.stdout))]
    for logger, handler in handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

    def target():
        named.info("named record from %d", _rank())
        unlisted.info("unlisted record from %d", _rank())

    sink = RecordingSink()
    try:
        launch(target, nprocs=2, sink=sink)
    finally:
        for logger, handler in handlers:
            logger.removeHandler(handler)
    for rank in (0, 1):
        assert sink.texts(rank, "stderr") == [f"named record from {rank}"]
        assert sink.texts(rank) == [f"unlisted record from {rank}"]


def test_a_line_written_just_before_a_crash_arrives(no_leaks):
    def target():
        print("last words", end="")
        os._exit(7)

    sink = RecordingSink()
    with pytest.raises(nbfabric.RankError, match="exited with code 7"):
        launch(target, nprocs=2, sink=sink)
    assert sink.texts(0) == ["last words"] or sink.texts(1) == ["last words"]


def test_progress_bars_are_not_split_into_lines(no_leaks):
    def target():
        for percent in (0, 50, 100):
            sys.stderr.write(f"\r{percent}%")
        sys.stderr.write("\n")

    class ProgressSink(RecordingSink):
        def __init__(self):
            super().__init__()
            self.updates = []

        def progress(self, rank, stream, text):
            self.updates.append((rank, text))

    sink = ProgressSink()
    launch(target, nprocs=1, sink=sink)
    assert sink.updates == [(0, "0%"), (0, "50%")]
    assert sink.texts(0, "stderr") == ["100%"]


def test_returns_rank_zero_value(no_leaks):
    assert launch(lambda: {"rank": _rank(), "tensor": torch.arange(3)}, nprocs=2, sink=Sink())["rank"] == 0


def test_a_100_megabyte_result_comes_back_without_deadlock(no_leaks):
    value = launch(lambda: bytes(100_000_000), nprocs=2, sink=Sink())
    assert len(value) == 100_000_000


def test_each_rank_sees_a_torchrun_environment_and_the_callers_is_unchanged(no_leaks, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    before = dict(os.environ)

    def target():
        env = {name: os.environ[name] for name in names}
        return env, torch.get_num_threads()

    env, threads = launch(target, nprocs=2, sink=Sink())
    cores = len(os.sched_getaffinity(0))
    assert env["RANK"] == env["LOCAL_RANK"] == env["NODE_RANK"] == "0"
    assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    assert env["OMP_NUM_THREADS"] == str(max(1, cores // 2)) and threads == max(1, cores // 2)
    assert dict(os.environ) == before


@pytest.mark.parametrize(
    ("nodes", "main_address", "chosen", "expected"),
    [
        (1, "127.0.0.1", None, "lo"),
        (2, "localhost", None, "lo"),  # every node on this machine: its hostname's address must not matter
        (2, "192.0.2.1", None, None),  # nodes on other machines: gloo picks the interface that reaches them
        (1, "127.0.0.1", "eth7", "eth7"),
    ],
)
def test_ranks_that_all_run_on_this_machine_talk_over_loopback(no_leaks, monkeypatch, nodes, main_address, chosen, expected):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    if chosen:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", chosen)
    interface = launch(lambda: os.environ.get("GLOO_SOCKET_IFNAME"), nprocs=2, num_nodes=nodes, main_address=main_address, sink=Sink())
    assert interface == expected


def test_a_thread_count_the_user_set_is_kept(no_leaks, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch(lambda: os.environ["OMP_NUM_THREADS"], nprocs=2, sink=Sink()) == "3"


def _nothing(fabric):
    return fabric.global_rank


def test_ranks_that_finished_together_are_let_go_as_the_launch_returns(no_leaks):
    """They stay after their end-of-run barrier, out of the way, only until the launcher has every
    rank's report (at most LET_GO_WAIT): gone within a fraction of that."""
    for _ in range(3):
        assert Fabric(accelerator="cpu", devices=2).launch(_nothing) == 0
        returned = time.monotonic()
        assert wait_for_reaping(LET_GO_WAIT)
        assert time.monotonic() - returned < LET_GO_WAIT / 5


def _pid(fabric):
    return os.getpid()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_inside_reaping_deferred_ranks_stay_until_the_block_ends(no_leaks):
    """A %%fabric cell shows its results before its ranks' teardown takes a core: they are let go
    as the block ends, or at once when waited for inside it."""
    with reaping_deferred():
        pid = Fabric(accelerator="cpu", devices=2).launch(_pid)
        time.sleep(0.3)
        assert _running(pid)
    assert wait_for_reaping(LET_GO_WAIT / 5)
    assert not _running(pid)
    with reaping_deferred():
        Fabric(accelerator="cpu", devices=2).launch(_pid)
        assert wait_for_reaping(LET_GO_WAIT / 5)


def test_no_forked_rank_begins_before_every_rank_is_forked(monkeypatch):
    """A rank at work would slow the forks still to come: rank 0 waits at the gate until the fork
    of the last rank (delayed here) is made, and then runs."""
    real_fork, parent, last_fork = os.fork, os.getpid(), []

    def fork_the_last_late():
        pid = real_fork()
        if pid and os.getpid() == parent and not last_fork:  # rank 0 is forked
            time.sleep(0.3)
            last_fork.append(time.monotonic())
        return pid

    monkeypatch.setattr(os, "fork", fork_the_last_late)
    rank_0_began = launch(time.monotonic, nprocs=2, sink=Sink())
    assert rank_0_began >= last_fork[0]


def test_fifty_launches_leak_nothing(no_leaks):
    for i in range(50):
        assert launch(lambda: i, nprocs=2, sink=Sink()) == i


def test_fork_is_refused_while_cuda_is_initialised(no_leaks, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    started = []
    with pytest.raises(ForkUnsafeError, match="start_method='spawn'"):
        launch(lambda: started.append(1), nprocs=2, sink=Sink())


def test_spawn_ships_a_closure_with_dill(no_leaks):
    offset = 40
    assert launch(lambda: offset + _rank() + 2, nprocs=2, start_method="spawn", sink=Sink()) == 42


def test_an_unknown_start_method_names_the_choices():
    with pytest.raises(ValueError, match="fork, spawn"):
        launch(lambda: None, nprocs=2, start_method="forkserver")


def _run_script(tmp_path, source: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, *args, str(script)], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path
    )


SCRIPT = """
    import torch
    from nbfabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=2)
    fabric.launch()
    total = fabric.all_reduce(torch.tensor(fabric.global_rank + 1.0), reduce_op="sum")
    print(f"rank {fabric.global_rank} of {fabric.world_size}: total {total.item():g}")
"""


def test_bare_launch_in_a_script_forks_the_ranks_which_run_the_rest(tmp_path):
    done = _run_script(tmp_path, SCRIPT)
    assert done.returncode == 0, done.stderr
    assert "[rank 0] rank 0 of 2: total 3" in done.stdout
    assert "[rank 1] rank 1 of 2: total 3" in done.stdout


def test_bare_launch_joins_ranks_started_by_torchrun(tmp_path):
    done = _run_script(tmp_path, SCRIPT, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    assert done.returncode == 0, done.stderr
    assert "rank 0 of 2: total 3" in done.stdout and "rank 1 of 2: total 3" in done.stdout


def test_a_failing_rank_in_a_script_exits_non_zero_with_its_traceback(tmp_path):
    done = _run_script(
        tmp_path,
        """
        from nbfabric import Fabric
        fabric = Fabric(accelerator="cpu", devices=2)
        fabric.launch()
        if fabric.global_rank == 1:
            raise ValueError("bad shard")
        fabric.barrier()
        """,
    )
    assert done.returncode == 1
    assert "rank 1 failed: ValueError: bad shard" in done.stderr
    assert 'raise ValueError("bad shard")' in done.stderr


def test_ranks_die_with_a_killed_parent(tmp_path):
    pids = tmp_path / "pids"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import os, time
                from nbfabric import launch
                def target():
                    with open({str(pids)!r}, "a") as f:
                        f.write(f"{{os.getpid()}}\\n")
                    time.sleep(60)
                launch(target, nprocs=2)
                """
            ),
        ],
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        _wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2)
        rank_pids = [int(pid) for pid in pids.read_text().split()]
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    _wait_for(lambda: not any(_alive(pid) for pid in rank_pids))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(condition, timeout: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_fork_is_refused_while_a_process_group_is_active(no_leaks):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ForkUnsafeError, match="destroy_process_group"):
            launch(lambda: None, nprocs=2, sink=Sink())
    finally:
        dist.destroy_process_group()


def _start_a_thread_that_writes_late(fabric, directory):
    def write_late():
        time.sleep(0.5)
        (directory / f"rank{fabric.global_rank}.txt").write_text("whole")
        print("thread done", flush=True)

    threading.Thread(target=write_late).start()
    return "returned"


def test_threads_a_rank_left_running_finish_before_the_launch_returns(tmp_path, capsys):
    """As at the end of a Python process (and of Lightning's ranks, multiprocessing processes):
    a thread still writing a file is not cut off, and what it prints arrives."""
    assert Fabric(accelerator="cpu", devices=2).launch(_start_a_thread_that_writes_late, tmp_path) == "returned"
    assert sorted(path.read_text() for path in tmp_path.glob("rank*.txt")) == ["whole", "whole"]
    shown = capsys.readouterr().out
    assert "[rank 0] thread done" in shown and "[rank 1] thread done" in shown
