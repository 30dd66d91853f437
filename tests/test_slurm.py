"""The rank pool and scripts on a real two-node Slurm cluster (nodes n1 and n2 on this machine:
../shared/cluster/start-local-slurm, which CI runs as root); skipped, saying why, where none can run, except in
CI (CI=true), where a missing cluster fails them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from typing import Iterator
from pathlib import Path

import pytest
from conftest import missing_service
from test_magic import Kernel

from nbfabric.pool import slurm_job

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)

START_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "cluster" / "start-local-slurm"


def _idle_nodes() -> int:
    try:
        listed = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return len(set(listed.stdout.split())) if listed.returncode == 0 else 0


@pytest.fixture(scope="module")
def slurm():
    """A Slurm cluster of two nodes: the running one, or one this module starts (as root) and stops."""
    started = False
    if _idle_nodes() < 2:
        if os.geteuid() != 0 or not START_SCRIPT.exists():
            missing_service("no Slurm cluster of two nodes here, and none can be started (needs root and start-local-slurm)")
        done = subprocess.run([str(START_SCRIPT)], capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or _idle_nodes() < 2:
            missing_service(f"start-local-slurm could not start a cluster: {done.stderr.strip()[-300:]}")
        started = True
    yield
    if started:
        subprocess.run([str(START_SCRIPT.with_name("stop-local-slurm"))], capture_output=True, timeout=120)


def our_jobs(name_prefix: str) -> list[str]:
    """Our jobs in the queue; fails the test when squeue cannot say (an error is not an empty queue)."""
    listed = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, f"squeue failed with status {listed.returncode}: {listed.stderr.strip()}"
    return [line for line in listed.stdout.splitlines() if line.split()[1].startswith(name_prefix)]


START = "%fabric start --engines=slurm --num-nodes=2 --devices=1 --controller-ip=127.0.0.1"
SLEEPING_CELL = "%%fabric --no-widgets\nimport time\nprint('working', flush=True)\ntime.sleep(600)"


def job_of(text: str) -> str:
    found = re.search(r"Slurm job (\d+)", text)
    assert found, f"no Slurm job named in: {text}"
    return found.group(1)


def cancel_and_wait(job: str, timeout: float = 90) -> None:
    """Cancel this test's job (by id) and wait until it has left the queue."""
    if job:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
        slurm_job.wait_until_gone([job], timeout)
        assert slurm_job.time_left(job) == "", f"Slurm job {job} is still in the queue"


@contextmanager
def slurm_pool(tmp_path, flags: str = "") -> Iterator[tuple[Kernel, str]]:
    """A kernel with a pool on a Slurm job (started with START and `flags`): the kernel and the job's
    id; afterwards the job is cancelled and gone, and the kernel closed."""
    kernel, job = Kernel(tmp_path / "none.json"), ""
    try:
        out = kernel.run(f"{START} {flags}".rstrip(), timeout=240)
        assert out["error"] is None, out
        job = job_of(out["stdout"])
        assert any(f"Slurm job {job}: RUNNING" in shown for shown in out["displays"]), out["displays"]
        yield kernel, job
    finally:
        cancel_and_wait(job)
        kernel.close()


def run_until_job_ends(kernel: Kernel, end_job) -> tuple[dict, float]:
    """Run a cell that sleeps on the pool, calling `end_job()` once the ranks run: what the cell
    showed, and the seconds from that call to the cell's end."""
    ended: list[float] = []

    def once_running(outputs: dict) -> None:
        if not ended and "working" in outputs["stdout"]:
            end_job()
            ended.append(time.monotonic())

    out = kernel.run(SLEEPING_CELL, timeout=300, on_output=once_running)
    assert ended, f"the cell never ran: {out}"
    return out, time.monotonic() - ended[0]


def test_a_pool_on_two_slurm_nodes_reduces_across_both_and_stops_clean(slurm, tmp_path):
    kernel = Kernel(tmp_path / "none.json")
    try:
        out = kernel.run("%fabric start --engines=slurm --num-nodes=2 --devices=1 --controller-ip=127.0.0.1", timeout=240)
        assert out["error"] is None, out
        assert "node n1" in out["stdout"] and "node n2" in out["stdout"]
        assert len(our_jobs("nbfabric-")) == 1
        out = kernel.run(
            "%%fabric --no-widgets\nimport os\n"
            "print('on', os.environ['SLURMD_NODENAME'])\n"
            "fabric.all_reduce(torch.tensor(fabric.global_rank + 1.0), reduce_op='sum').item()"
        )
        assert out["error"] is None, out["error"]
        assert out["result"] == "3.0"
        assert "[rank 0] on n1" in out["stdout"] and "[rank 1] on n2" in out["stdout"]
        assert "stopped: no engine is left" in kernel.run("%fabric stop-pool", timeout=120)["stdout"]
        assert our_jobs("nbfabric-") == []
        kernel.assert_no_ranks_left(grace=15)
    finally:
        kernel.close()


def test_srun_tasks_join_one_run_from_slurms_variables(slurm, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            from nbfabric import Fabric
            fabric = Fabric(accelerator="cpu", devices=1, num_nodes=2)
            fabric.launch()
            total = fabric.all_reduce(torch.tensor(fabric.global_rank + 1.0), reduce_op="sum").item()
            print(f"rank {fabric.global_rank} of {fabric.world_size} on node {fabric.node_rank}: {total}")
            """
        )
    )
    done = subprocess.run(
        [shutil.which("srun"), "-N", "2", "-n", "2", "--job-name=nbfabric-test-srun", sys.executable, str(script)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "rank 0 of 2 on node 0: 3.0" in done.stdout and "rank 1 of 2 on node 1: 3.0" in done.stdout


def test_srun_tasks_of_nbfabric_run_are_the_ranks_of_one_run(slurm, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, torch
            from nbfabric import Fabric
            fabric = Fabric()  # settings from nbfabric run, ranks from Slurm
            fabric.launch()
            total = fabric.all_reduce(torch.tensor(fabric.global_rank + 1.0), reduce_op="sum").item()
            print(f"rank {fabric.global_rank} of {fabric.world_size}: {total} {sys.argv[1:]}")
            """
        )
    )
    command = [shutil.which("srun"), "-N", "2", "-n", "2", "--job-name=nbfabric-test-run", sys.executable, "-m", "nbfabric", "run", str(script), "--accelerator=cpu", "--lr", "0.1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "rank 0 of 2: 3.0 ['--lr', '0.1']" in done.stdout and "rank 1 of 2: 3.0 ['--lr', '0.1']" in done.stdout


@pytest.mark.parametrize(
    ("now", "said"),
    [
        (slurm_job.JobState("COMPLETING", "None", restarts=1), "Slurm job 7 was requeued: it lost a node or was preempted"),
        (slurm_job.JobState("PENDING", "BeginTime", restarts=1), "Slurm job 7 was requeued: it lost a node or was preempted; Slurm's reason: BeginTime"),
        (slurm_job.JobState("COMPLETING", "None"), "Slurm job 7 was cancelled by scancel"),
        (slurm_job.JobState("COMPLETING", "None", out_of_time=True), "Slurm job 7 was ended by its time limit (--time)"),
        (slurm_job.JobState("NODE_FAIL", "None"), "Slurm job 7 lost a node (NODE_FAIL)"),
        (slurm_job.JobState("PENDING", "Resources"), ""),
        (slurm_job.JobState("RUNNING", "None", restarts=1), ""),
    ],
)
def test_how_a_job_ended_is_told_from_what_slurm_shows(now, said):
    """A requeued job is told apart from a cancelled one already while Slurm completes it (its
    restarts); one that waits or runs has not ended."""
    assert slurm_job.ending("7", now) == said
    assert slurm_job.requeued(now) == ("requeued" in said)


def test_bad_slurm_options_are_refused_before_any_job(tmp_path):
    kernel = Kernel(tmp_path / "none.json")
    try:
        out = kernel.run("%fabric start --engines=local --partition=debug")
        assert "--partition and --time are Slurm's; use them with --engines=slurm" in out["stderr"]
        out = kernel.run("%fabric start --engines=local --num-nodes=2 --devices=1")
        assert "needs engines on several machines" in out["stderr"]
        if shutil.which("mpiexec") is None:
            assert "--engines=mpi needs mpiexec, which is not on PATH here" in kernel.run("%fabric start --engines=mpi")["stderr"]
        assert kernel.children() == []
        if _idle_nodes() >= 2:  # where no Slurm controller runs, no job can have been submitted
            assert our_jobs("nbfabric-") == []
    finally:
        kernel.close()


def test_a_job_asking_for_more_nodes_than_the_cluster_has_fails_at_once_and_leaves_no_job(slurm, tmp_path):
    kernel, before = Kernel(tmp_path / "none.json"), set(our_jobs("nbfabric-"))
    try:
        started = time.monotonic()
        out = kernel.run("%fabric start --engines=slurm --num-nodes=3 --devices=1 --controller-ip=127.0.0.1", timeout=60)
        took = time.monotonic() - started
        assert "Slurm refuses the job (--nodes=3 --ntasks-per-node=1)" in out["stderr"], out
        assert "Requested node configuration is not available" in out["stderr"] and "--num-nodes" in out["stderr"]
        assert took < 10, f"refused after {took:.1f} s"
        assert set(our_jobs("nbfabric-")) <= before and kernel.children() == []  # others' tests may run jobs
        assert "no rank pool" in kernel.run("%fabric pool")["stdout"]
    finally:
        kernel.close()


def test_an_unknown_partition_is_refused_naming_slurms_message(slurm, tmp_path):
    kernel = Kernel(tmp_path / "none.json")
    try:
        out = kernel.run("%fabric start --engines=slurm --num-nodes=1 --devices=1 --partition=nosuchpartition")
        assert "invalid partition specified: nosuchpartition" in out["stderr"], out
        assert "Change --partition" in out["stderr"]
        assert kernel.children() == []
    finally:
        kernel.close()


def test_a_pending_job_that_can_never_start_is_told_apart_from_one_that_waits(slurm, tmp_path):
    """Where sbatch takes a job no node can run (here: 3 nodes of 2), it pends for ever: seen at once."""
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes=3", "--job-name=nbfabric-test-hopeless", f"--output={tmp_path / 'out'}", "--wrap=true"],
        capture_output=True, text=True, timeout=30,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    try:
        started = time.monotonic()
        with pytest.raises(slurm_job.SlurmRefusal, match=rf"Slurm job {job} cannot start: .*--num-nodes"):
            slurm_job.wait_for_engines(job, lambda: 0, 3, nodes=3, partition=None, timeout=60)
        assert time.monotonic() - started < 10
    finally:
        cancel_and_wait(job)


def test_a_cancelled_job_fails_the_running_cell_within_15_s_and_ends_the_pool(slurm, tmp_path):
    with slurm_pool(tmp_path) as (kernel, job):
        out, took = run_until_job_ends(kernel, lambda: subprocess.run(["scancel", job], timeout=30))
        print(f"cancelled job {job}: the cell failed {took:.1f} s after scancel")
        shown = out["stderr"] + "".join(out["error"]["traceback"] if out["error"] else [])
        assert out["error"] is not None and took < 15, (took, out)
        assert f"Slurm job {job} was cancelled by scancel" in shown, shown
        assert "KeyError" not in shown, shown
        assert "no rank pool: " in kernel.run("%fabric pool")["stdout"]
        slurm_job.wait_until_gone([job], 90)
        kernel.assert_no_ranks_left(grace=15)


def test_a_job_cancelled_between_cells_is_named_by_the_next_cell_and_pool_command(slurm, tmp_path):
    with slurm_pool(tmp_path) as (kernel, job):
        subprocess.run(["scancel", job], timeout=30)
        slurm_job.wait_until_gone([job], 90)
        deadline = time.monotonic() + 30
        while "rank 0: node" in (shown := kernel.run("%fabric pool")["stdout"]) and time.monotonic() < deadline:
            time.sleep(0.5)  # until the controller has dropped the engines
        assert f"no rank pool: Slurm job {job} was cancelled by scancel: the engines of ranks 0, 1 are gone" in shown, shown
        refused = kernel.run("%%fabric --no-widgets\nprint('ran')")
        assert "ran" not in refused["stdout"] and f"Slurm job {job} was cancelled by scancel" in refused["stderr"], refused
        kernel.assert_no_ranks_left(grace=15)


def test_a_job_that_reaches_its_time_limit_fails_the_running_cell_saying_so(slurm, tmp_path):
    with slurm_pool(tmp_path, "--time=1") as (kernel, job):
        assert re.search(rf"Slurm job {job}, time left: (1:00|0:[0-5]\d)\n", kernel.run("%fabric pool")["stdout"])
        started = time.monotonic()
        out = kernel.run(SLEEPING_CELL, timeout=300)  # Slurm ends the job 60 s in, give or take its 30 s checks
        print(f"time-limited job {job}: the cell failed {time.monotonic() - started:.1f} s after it started")
        shown = out["stderr"] + "".join(out["error"]["traceback"] if out["error"] else [])
        assert f"Slurm job {job} was ended by its time limit (--time)" in shown, shown
        assert "KeyError" not in shown, shown
        slurm_job.wait_until_gone([job], 90)
        kernel.assert_no_ranks_left(grace=15)


def test_a_node_going_down_under_a_running_cell_fails_it_saying_so_and_leaves_no_job(slurm, tmp_path):
    """Slurm requeues the job (its engines are gone): the cell fails within 15 s saying that a node
    was lost, and the requeued job is cancelled, not left to start engines nobody uses."""
    kernel, job = Kernel(tmp_path / "none.json"), ""
    try:
        out = kernel.run(START, timeout=240)
        assert out["error"] is None, out
        job = job_of(out["stdout"])
        down = ["scontrol", "update", "nodename=n2", "state=down", "reason=nbfabric test"]
        out, took = run_until_job_ends(kernel, lambda: subprocess.run(down, timeout=30, check=True))
        print(f"node down under job {job}: the cell failed {took:.1f} s after")
        shown = out["stderr"] + "".join(out["error"]["traceback"] if out["error"] else [])
        assert out["error"] is not None and took < 15, (took, out)
        assert f"Slurm job {job} was requeued: it lost a node or was preempted" in shown, shown
        assert "was cancelled by scancel" not in shown and "KeyError" not in shown, shown
        slurm_job.wait_until_gone([job], 90)
        assert slurm_job.time_left(job) == "", f"the requeued job {job} is still in the queue"
        kernel.assert_no_ranks_left(grace=15)
    finally:
        subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], capture_output=True, timeout=30)
        cancel_and_wait(job)
        kernel.close()
