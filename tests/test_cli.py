"""The `nbfabric` command run as a real process: `run` on one node and on two, `env`, `install-kernel`."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

import nbfabric
from nbfabric import cli
from nbfabric.launcher.environment import RUN_KEY_ENV
from nbfabric.launcher.keyed_store import MAKE_A_KEY

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)

NBFABRIC = [sys.executable, "-m", "nbfabric"]
CPU2 = ["--accelerator=cpu", "--devices=2"]
KEY = "5f0c7a4e9d2b41c3a8e6f1d07b9c2e45"  # a run key for the runs on several nodes
MARKER = "NBFABRIC_CLI_TEST_RUN"


def _marked(marker: str) -> list[psutil.Process]:
    """Every process whose environment carries this test's marker (ranks and torchrun's workers included)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARKER) == marker:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.fixture
def env(tmp_path):
    """The command's environment: no settings file, no rank variables; a marker to find what it started."""
    skipped = ("NBFABRIC_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "NODE_RANK", "GROUP_RANK", "TORCHELASTIC_")
    environment = {name: value for name, value in os.environ.items() if not name.startswith(skipped)}
    environment["NBFABRIC_CONFIG"] = str(tmp_path / "no-settings.json")
    environment[MARKER] = uuid.uuid4().hex
    yield environment
    deadline = time.monotonic() + 10
    while _marked(environment[MARKER]) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _marked(environment[MARKER])
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, f"processes left running: {[p.pid for p in left]}"


def nbfabric_command(*args: str, env: dict, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*NBFABRIC, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----------------------------------------------------------------- one node
def test_each_rank_runs_the_script_as_python_would_with_tagged_output(tmp_path, env):
    write(tmp_path / "job" / "helper.py", "VALUE = 42\n")
    script = write(
        tmp_path / "job" / "train.py",
        """
        import os, sys
        import helper
        print("args", sys.argv[1:], __name__, helper.VALUE, "rank", os.environ["RANK"])
        print("warning from", os.environ["RANK"], file=sys.stderr)
        os.write(1, b"raw write\\n")
        """,
    )
    (tmp_path / "elsewhere").mkdir()
    done = nbfabric_command("run", *CPU2, str(script), "--lr", "3", "x", env=env, cwd=tmp_path / "elsewhere")
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] args ['--lr', '3', 'x'] __main__ 42 rank {rank}\n" in done.stdout
        assert f"[rank {rank}] warning from {rank}\n" in done.stderr
    assert done.stdout.count("] raw write\n") == 2


def test_fabric_takes_its_settings_from_the_flags_over_the_settings_file(tmp_path, env):
    settings = write(tmp_path / "settings.json", json.dumps({"accelerator": "cpu", "devices": 2, "precision": "64"}))
    script = write(
        tmp_path / "train.py",
        """
        from nbfabric import Fabric
        fabric = Fabric()
        fabric.launch()
        total = fabric.all_reduce(fabric.global_rank + 1, reduce_op="sum")
        print("world", fabric.world_size, fabric.config.accelerator, fabric.config.precision, "sum", int(total))
        """,
    )
    done = nbfabric_command("run", "--config", str(settings), "--precision=bf16", str(script), env=env)
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] world 2 cpu bf16-mixed sum 3\n" in done.stdout


def test_a_precision_the_cpu_runs_otherwise_is_one_plain_note(tmp_path, env):
    script = write(tmp_path / "train.py", "from nbfabric import Fabric\nprint(Fabric().config.precision)\n")
    done = nbfabric_command("run", "--accelerator=cpu", "--devices=2", "--precision=16-mixed", "--ranks=0", str(script), env=env)
    assert done.returncode == 0, done.stderr
    assert "[rank 0] bf16-mixed\n" in done.stdout
    assert done.stderr.count("nbfabric run: precision='16-mixed' (float16 autocast) is meant for GPUs") == 1
    assert "UserWarning" not in done.stderr and "warnings.warn" not in done.stderr


def test_run_flags_after_the_script_are_taken_as_lightning_takes_them(tmp_path, env):
    script = write(tmp_path / "train.py", "import sys\nfrom nbfabric import Fabric\nfabric = Fabric()\nprint(fabric.world_size, fabric.config.precision, sys.argv[1:])\n")
    done = nbfabric_command("run", "--ranks=0", str(script), "--accelerator=cpu", "--devices", "2", "--epochs", "3", "--precision=bf16-mixed", "--debug", "--timeout", "2", env=env)
    assert done.returncode == 0, done.stderr
    # nbfabric's own flags that `fabric run` lacks are the script's after it
    assert "[rank 0] 2 bf16-mixed ['--epochs', '3', '--debug', '--timeout', '2']\n" in done.stdout
    ended = nbfabric_command("run", "--accelerator=cpu", "--devices=1", str(script), "--", "--devices=5", env=env)
    assert ended.returncode == 0, ended.stderr
    assert "[rank 0] 1 32-true ['--devices=5']\n" in ended.stdout
    twice = nbfabric_command("run", "--devices=1", str(script), "--devices=2", env=env)
    assert twice.returncode == 2 and "--devices is given both before and after the script" in twice.stderr


def test_a_null_in_the_settings_file_means_not_set_as_in_the_magic(tmp_path, env):
    settings = write(tmp_path / "settings.json", json.dumps({"accelerator": "cpu", "devices": 2, "precision": None}))
    script = write(tmp_path / "train.py", "from nbfabric import Fabric\nprint(Fabric().config.precision)\n")
    done = nbfabric_command("run", "--config", str(settings), "--ranks=0", str(script), env=env)
    assert done.returncode == 0, done.stderr
    assert "[rank 0] 32-true\n" in done.stdout


def test_a_fabric_argument_that_conflicts_with_a_flag_is_an_error(tmp_path, env):
    script = write(tmp_path / "train.py", "from nbfabric import Fabric\nFabric(accelerator='cpu', devices=3)\n")
    done = nbfabric_command("run", *CPU2, str(script), env=env)
    assert done.returncode == 1
    assert "Fabric(devices=3) conflicts with `nbfabric run --devices=2`" in done.stderr


def test_a_bad_flag_exits_2_naming_the_choices_and_starts_nothing(tmp_path, env):
    script = write(tmp_path / "train.py", f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    done = nbfabric_command("run", "--accelerator=cpu", "--precision=17", str(script), env=env)
    assert done.returncode == 2
    assert "precision='17' is not valid; choose one of 32-true, 16-mixed, bf16-mixed" in done.stderr
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--accelerator=tpu"], "accelerator='tpu' is not valid; choose one of auto, cpu, cuda, gpu, mps"),
        (["--devices=0"], "devices='0' is not valid"),
        (["--num-nodes=2", f"--run-key={KEY}"], "--num-nodes=2 needs --main-address"),
        (["--num-nodes=2", "--node-rank=2", "--main-address=h"], "--node-rank=2 is not valid with --num-nodes=2; choose 0 to 1"),
        (["--num-nodes=2", "--main-address=h"], f"--num-nodes=2 needs a run key, the same on every node, so that its store admits only the run's own processes: make one with `{MAKE_A_KEY}`"),
        (["--num-nodes=2", "--main-address=h", "--run-key=short"], "--num-nodes=2 has a run key of 5 characters; it needs 16 or more"),
        (["--ranks=2"], "--ranks='2' is not valid; use all, or ranks from 0 to 1"),
        (["--timeout=0"], "timeout=0 is not valid; give a number of seconds above 0"),
        (["--main-port=70000"], "--main-port=70000 is not valid"),
        (["--config=BROKEN"], "cannot read the nbfabric settings file"),
        (["--strategy=ddp_spawn", "--start-method=fork"], "strategy='ddp_spawn' starts ranks with spawn, which conflicts with start_method='fork'"),
    ],
)
def test_bad_flags_are_refused_before_anything_starts(tmp_path, capsys, monkeypatch, no_leaks, flags, message):
    monkeypatch.delenv(RUN_KEY_ENV, raising=False)
    (tmp_path / "BROKEN").write_text("{not json")
    script = write(tmp_path / "train.py", "")
    flags = [flag.replace("BROKEN", str(tmp_path / "BROKEN")) for flag in flags]
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", *CPU2, *flags, str(script)])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_script_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", *CPU2, str(tmp_path / "nowhere.py")])
    assert exited.value.code == 2
    assert "nowhere.py' does not exist" in capsys.readouterr().err


def test_a_script_written_for_torchrun_runs_unchanged(tmp_path, env):
    script = write(
        tmp_path / "train.py",
        """
        import os, torch, torch.distributed as dist
        dist.init_process_group("gloo")
        total = torch.tensor([dist.get_rank() + 1.0])
        dist.all_reduce(total)
        print("rank", dist.get_rank(), "of", dist.get_world_size(), "local", os.environ["LOCAL_RANK"], "sum", int(total))
        dist.destroy_process_group()
        """,
    )
    done = nbfabric_command("run", *CPU2, str(script), env=env)
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] rank {rank} of 2 local {rank} sum 3\n" in done.stdout


def test_a_script_written_for_accelerate_runs_unchanged(tmp_path, env):
    pytest.importorskip("accelerate")
    script = write(
        tmp_path / "train.py",
        """
        import torch
        from accelerate import Accelerator
        accelerator = Accelerator()
        total = accelerator.reduce(torch.tensor([accelerator.process_index + 1.0]), reduction="sum")
        print("process", accelerator.process_index, "of", accelerator.num_processes, "sum", int(total), accelerator.mixed_precision)
        """,
    )
    done = nbfabric_command("run", *CPU2, "--precision=bf16-mixed", str(script), env=env)
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] process {rank} of 2 sum 3 bf16\n" in done.stdout


def test_each_rank_draws_its_own_unseeded_random_numbers_as_separate_interpreters_do(tmp_path, env):
    script = write(tmp_path / "draw.py", "import random, numpy, torch\nprint('draws', torch.rand(1).item(), numpy.random.rand(), random.random())\n")
    done = nbfabric_command("run", *CPU2, str(script), env=env)
    assert done.returncode == 0, done.stderr
    draws = [line.split("draws ")[1].split() for line in done.stdout.splitlines() if "draws" in line]
    assert len(draws) == 2 and all(first != second for first, second in zip(*draws)), draws


def test_a_lightning_script_takes_the_flags_given_and_a_script_s_own_settings_rule_the_rest(tmp_path, env):
    pytest.importorskip("lightning")
    script = write(
        tmp_path / "train.py",
        """
        import sys
        import lightning as L
        from nbfabric import Fabric
        if sys.argv[1] == "lightning":
            fabric = L.Fabric(accelerator="cpu", strategy="ddp")
            fabric.launch()
            print(fabric.world_size, type(fabric.strategy).__name__, type(fabric.strategy.precision).__name__)
        else:  # the script's own precision, where no flag set one
            print(Fabric(precision="bf16-mixed").config.precision)
        """,
    )
    done = nbfabric_command("run", *CPU2, "--precision=bf16-mixed", "--ranks=0", str(script), "lightning", env=env)
    assert done.returncode == 0, done.stderr
    assert "[rank 0] 2 DDPStrategy MixedPrecision\n" in done.stdout
    done = nbfabric_command("run", *CPU2, "--ranks=0", str(script), "nbfabric", env=env)
    assert done.returncode == 0, done.stderr
    assert "[rank 0] bf16-mixed\n" in done.stdout


FAILING = """
import sys, time

def step(rank):
    print("rank", rank, "started")
    fabric.barrier()
    if rank == 1:
        {failure}
    time.sleep(60)
    print("rank", rank, "finished")

from nbfabric import Fabric
fabric = Fabric()
fabric.launch()
step(fabric.global_rank)
"""


@pytest.mark.parametrize(
    "failure, status, message",
    [
        ("raise ValueError('bad batch 7')", 1, "rank 1 failed: ValueError: bad batch 7"),
        ("sys.exit(3)", 3, "rank 1 failed: exited with code 3"),
    ],
)
def test_a_failing_rank_stops_the_others_and_sets_the_exit_status(tmp_path, env, failure, status, message):
    script = write(tmp_path / "train.py", FAILING.format(failure=failure))
    started = time.monotonic()
    done = nbfabric_command("run", *CPU2, "--ranks=0", str(script), env=env)
    assert time.monotonic() - started < 30
    assert done.returncode == status
    assert message in done.stderr
    assert "stopped: rank 0" in done.stderr
    assert done.stdout == "[rank 0] rank 0 started\n"  # --ranks=0 hides rank 1's output, not its failure
    if status == 1:  # the rank's own traceback, down to the line that raised
        assert "Traceback from rank 1:" in done.stderr
        assert f'File "{script}", line 8, in step\n    {failure}\n' in done.stderr


def test_a_script_s_atexit_handlers_run_in_each_rank_after_fabric_waited_for_its_peers(tmp_path, env):
    """As at the end of `python script.py`: the handlers run at the script's end and after
    sys.exit(0); Fabric's own (registered later, so run earlier) first waits for the peers, so a
    rank never leaves the process group while a peer still joins or uses it."""
    script = write(
        tmp_path / "train.py",
        """
        import atexit, sys, time
        atexit.register(lambda: print(f"last handler at {time.monotonic():.6f}"))
        from nbfabric import Fabric
        fabric = Fabric()
        if fabric.global_rank == 1:
            time.sleep(0.5)
            print(f"done at {time.monotonic():.6f}")
            sys.exit(0)
        """,
    )
    done = nbfabric_command("run", *CPU2, str(script), env=env)
    assert done.returncode == 0, done.stderr
    last = {rank: float(value) for rank, value in re.findall(r"^\[rank (\d)\] last handler at ([\d.]+)$", done.stdout, re.M)}
    rank_1_done = float(re.search(r"^\[rank 1\] done at ([\d.]+)$", done.stdout, re.M).group(1))
    assert set(last) == {"0", "1"}, done.stdout
    assert last["0"] >= rank_1_done  # rank 0 waited for rank 1 before its last handler ran


def test_a_collective_that_one_rank_never_reaches_fails_the_run_instead_of_waiting_forever(tmp_path, env):
    script = write(
        tmp_path / "train.py",
        """
        from nbfabric import Fabric
        fabric = Fabric()
        if fabric.global_rank == 0:
            fabric.barrier()
        print("end of script")
        """,
    )
    started = time.monotonic()
    done = nbfabric_command("run", *CPU2, str(script), env=env)
    assert time.monotonic() - started < 30
    assert done.returncode == 1
    assert f"nbfabric run: rank 0 waits in barrier at {script}, line 5: a collective that rank 1 will not take part in" in done.stderr
    assert "rank 1: finished, waiting for the other ranks" in done.stderr
    assert done.stdout == "[rank 1] end of script\n"



def test_a_script_ending_with_os_exit_0_succeeds_and_one_that_leaves_its_peer_in_a_collective_is_named(tmp_path, env):
    ends = write(tmp_path / "ends.py", "import os\nprint('done', flush=True)\nos._exit(0)\n")  # a script's own way to skip teardown
    done = nbfabric_command("run", *CPU2, str(ends), env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == ["[rank 0] done", "[rank 1] done"]
    leaves = write(
        tmp_path / "leaves.py",
        """
        import os, torch
        from nbfabric import Fabric
        fabric = Fabric()
        if fabric.global_rank == 1:
            os._exit(0)
        fabric.all_reduce(torch.ones(1))
        """,
    )
    done = nbfabric_command("run", *CPU2, str(leaves), env=env)
    assert done.returncode == 1
    assert "nbfabric run: rank 1 failed: ended with exit status 0 in the middle of the run" in done.stderr


@pytest.mark.parametrize("flag", ["--start-method=spawn", "--strategy=ddp_spawn"])
def test_a_script_s_bare_launch_joins_the_spawned_ranks_and_the_command_ends_cleanly(tmp_path, env, flag):
    """The usual `fabric = Fabric(); fabric.launch()` script: under `nbfabric run` its ranks exist
    already, however they were started."""
    script = write(tmp_path / "train.py", "from nbfabric import Fabric\nfabric = Fabric()\nfabric.launch()\nprint('rank', fabric.global_rank)\n")
    done = nbfabric_command("run", "--accelerator=cpu", "--devices=2", flag, str(script), env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == ["[rank 0] rank 0", "[rank 1] rank 1"]
    assert done.stderr == ""  # nothing at exit either (the ranks were waited for once)

def test_timeout_stops_every_rank_with_status_124(tmp_path, env):
    script = write(tmp_path / "train.py", "import time\ntime.sleep(60)\nprint('finished')\n")
    started = time.monotonic()
    done = nbfabric_command("run", *CPU2, "--timeout=3", str(script), env=env)
    assert time.monotonic() - started < 30
    assert done.returncode == 124
    assert "did not finish within timeout=3 s" in done.stderr
    for rank in (0, 1):  # where each rank was, taken before the ranks were stopped
        assert f"rank {rank}: time.sleep at {script}, line 2\n    {script}, line 2, in <module>: time.sleep(60)" in done.stderr
    assert "finished" not in done.stdout


def _signalled_while_running(tmp_path, env, sig) -> tuple[int, str, list[int]]:
    """Run a script whose ranks each start a child and sleep; once they are all there, send `sig`
    to `nbfabric run`: its status, its stderr, and the pids of the ranks and their children."""
    script = write(
        tmp_path / "train.py",
        f"""
        import os, pathlib, subprocess, time
        child = subprocess.Popen(["sleep", "120"])
        pathlib.Path({str(tmp_path)!r}, "ready-" + os.environ["RANK"]).write_text(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(120)
        """,
    )
    command = subprocess.Popen([*NBFABRIC, "run", *CPU2, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = [tmp_path / "ready-0", tmp_path / "ready-1"]
        deadline = time.monotonic() + 30
        while not all(path.exists() and path.read_text() for path in ready) and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [int(pid) for path in ready for pid in path.read_text().split()]
        command.send_signal(sig)
        _, stderr = command.communicate(timeout=30)
    finally:
        command.kill()
        command.wait()
    deadline = time.monotonic() + 5
    while [pid for pid in pids if psutil.pid_exists(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in pids if psutil.pid_exists(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return command.returncode, stderr, left


def test_an_interrupt_stops_every_rank_and_what_they_started_with_status_130(tmp_path, env):
    returncode, stderr, left = _signalled_while_running(tmp_path, env, signal.SIGINT)
    assert returncode == 130
    assert "interrupted; every rank was stopped" in stderr
    assert not left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_stops_every_rank_and_what_they_started_then_ends_the_command(tmp_path, env, sig):
    """As `kill`, `timeout`, a scheduler or a closed terminal send them: the ranks and their own
    children end, rather than the children outliving the ranks."""
    returncode, stderr, left = _signalled_while_running(tmp_path, env, sig)
    assert returncode == -sig
    assert f"nbfabric: {sig.name}: every rank was stopped" in stderr
    assert not left

# ----------------------------------------------------------------- two nodes on this machine
TWO_NODES = """
import os
import sys
from nbfabric import Fabric
fabric = Fabric()
fabric.launch()
total = fabric.all_reduce(fabric.global_rank + 1, reduce_op="sum")
print("rank", fabric.global_rank, "of", fabric.world_size, "on node", fabric.node_rank, "sum", int(total))
print("rank", fabric.global_rank, "gloo on", os.environ.get("GLOO_SOCKET_IFNAME"))
if fabric.global_rank == int(sys.argv[1]):
    raise ValueError("bad batch on rank " + sys.argv[1])
fabric.barrier()
print("rank", fabric.global_rank, "finished")
"""


def run_two_nodes(tmp_path: Path, env: dict, failing_rank: int) -> list[subprocess.CompletedProcess]:
    """Two `nbfabric run` processes on loopback, 2 ranks each; returns each node's result."""
    script = write(tmp_path / "train.py", TWO_NODES)
    flags = [*CPU2, "--num-nodes=2", "--main-address=127.0.0.1", f"--main-port={free_port()}"]
    nodes = [
        subprocess.Popen(
            [*NBFABRIC, "run", *flags, f"--node-rank={node}", str(script), str(failing_rank)],
            env={**env, RUN_KEY_ENV: KEY}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=90) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
            node.wait()
    return [subprocess.CompletedProcess(node.args, node.returncode, *out) for node, out in zip(nodes, outputs)]


def test_two_nodes_all_reduce_over_four_ranks(tmp_path, env):
    nodes = run_two_nodes(tmp_path, env, failing_rank=-1)
    for node, ranks in zip(nodes, ((0, 1), (2, 3))):
        assert node.returncode == 0, node.stderr
        for rank in ranks:
            assert f"[rank {rank}] rank {rank} of 4 on node {rank // 2} sum 10\n" in node.stdout
            assert f"[rank {rank}] rank {rank} finished\n" in node.stdout
            assert f"[rank {rank}] rank {rank} gloo on lo\n" in node.stdout


def test_a_failure_on_one_node_stops_the_other(tmp_path, env):
    started = time.monotonic()
    nodes = run_two_nodes(tmp_path, env, failing_rank=3)
    assert time.monotonic() - started < 60
    assert [node.returncode for node in nodes] == [1, 1]
    assert "nbfabric run: rank 3 failed: ValueError: bad batch on rank 3" in nodes[1].stderr
    assert 'line 11, in <module>\n    raise ValueError("bad batch on rank " + sys.argv[1])' in nodes[1].stderr
    assert "stopped: rank 2" in nodes[1].stderr
    assert all("finished" not in node.stdout for node in nodes)


JOIN_THEN_PRINT = "from nbfabric import Fabric\nFabric().launch()\nprint('started')\n"


def test_a_node_waiting_for_the_others_stops_at_the_timeout(tmp_path, env):
    script = write(tmp_path / "train.py", JOIN_THEN_PRINT)
    flags = [*CPU2, "--num-nodes=2", "--main-address=127.0.0.1", f"--main-port={free_port()}", "--timeout=3"]
    started = time.monotonic()
    done = nbfabric_command("run", *flags, str(script), env={**env, RUN_KEY_ENV: KEY})
    assert time.monotonic() - started < 30
    assert done.returncode == 124
    assert "did not finish within timeout=3 s" in done.stderr
    assert "started" not in done.stdout


def _listens(pid: int, port: int) -> bool:
    """Whether a process started by `pid` listens on `port` (node 0 waiting in the rendezvous)."""
    for process in psutil.Process(pid).children(recursive=True):
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in process.net_connections("tcp")):
                return True
        except psutil.NoSuchProcess:
            pass
    return False


def test_an_interrupt_stops_a_node_waiting_for_the_others(tmp_path, env):
    script = write(tmp_path / "train.py", JOIN_THEN_PRINT)
    port = free_port()
    flags = [*CPU2, "--num-nodes=2", "--main-address=127.0.0.1", f"--main-port={port}"]
    command = subprocess.Popen(
        [*NBFABRIC, "run", *flags, str(script)], env={**env, RUN_KEY_ENV: KEY}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not _listens(command.pid, port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _listens(command.pid, port), "node 0 never began to wait for node 1"
        command.send_signal(signal.SIGINT)
        stdout, stderr = command.communicate(timeout=30)
    finally:
        command.kill()
        command.wait()
    assert command.returncode == 130
    assert "interrupted; every rank of this node was stopped" in stderr
    assert "started" not in stdout


# ----------------------------------------------------------------- env and install-kernel
def test_version_and_a_bare_command_answer_without_error(env):
    version = nbfabric_command("--version", env=env)
    assert version.returncode == 0 and version.stdout.strip() == f"nbfabric {nbfabric.__version__}"
    bare = nbfabric_command(env=env)
    assert bare.returncode == 0 and "usage: nbfabric" in bare.stdout and "run" in bare.stdout


def test_env_reports_versions_hardware_and_settings(tmp_path, env):
    import ipykernel
    import ipywidgets
    import torch

    settings = write(tmp_path / "settings.json", json.dumps({"accelerator": "cpu", "devices": 2}))
    console_script = Path(sys.executable).with_name("nbfabric")
    done = subprocess.run([str(console_script), "env"], env={**env, "NBFABRIC_CONFIG": str(settings)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    python = next(line for line in lines if line.startswith(f"python: {platform.python_version()} ("))
    assert Path(python.split("(", 1)[1].rstrip(")")).parent == console_script.parent  # the console script's own interpreter
    for expected in (
        f"nbfabric: {nbfabric.__version__}",
        f"torch: {torch.__version__}",
        f"ipykernel: {ipykernel.__version__}",
        f"ipywidgets: {ipywidgets.__version__}",
        f"settings file: {settings} ({json.dumps({'accelerator': 'cpu', 'devices': 2})})",
        "settings in effect: --accelerator=cpu --devices=2 --strategy=ddp --precision=32-true",
        f"NBFABRIC_CONFIG={settings}",
    ):
        assert expected in lines
    assert any(line.startswith(f"hardware: {len(os.sched_getaffinity(0))} CPU cores") for line in lines)


def test_installed_kernel_runs_a_fabric_cell_without_load_ext(tmp_path, env):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    prefix = tmp_path / "prefix"
    done = nbfabric_command("install-kernel", "--name=nbfabric-test", f"--prefix={prefix}", env=env)
    assert done.returncode == 0, done.stderr
    kernels = prefix / "share" / "jupyter" / "kernels"
    assert json.loads((kernels / "nbfabric-test" / "kernel.json").read_text())["display_name"] == "Python (nbfabric)"

    specs = KernelSpecManager(kernel_dirs=[str(kernels)])
    manager = KernelManager(kernel_name="nbfabric-test", kernel_spec_manager=specs)
    manager.start_kernel(env=env)
    client = manager.client()
    shown: list[str] = []  # streamed text, and the plain-text form of what the cell displayed
    errors: list[dict] = []

    def collect(message):
        content = message["content"]
        if message["msg_type"] == "stream":
            shown.append(content["text"])
        elif message["msg_type"] == "display_data":
            shown.append(content["data"].get("text/plain", "") + "\n")
        elif message["msg_type"] == "error":
            errors.append(content)

    try:
        client.start_channels()
        client.wait_for_ready(timeout=60)
        cell = '%%fabric --accelerator=cpu --devices=2\nimport os\nprint("hello", fabric.global_rank, os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"])\n'
        client.execute_interactive(cell, output_hook=collect, timeout=120)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert errors == []
    assert "[rank 0] hello 0 1\n" in "".join(shown)
    assert "[rank 1] hello 1 1\n" in "".join(shown)
