"""The Slurm job that holds a rank pool's engines: its batch options, whether Slurm can ever run
it, its state and Slurm's reason while it waits, how it ended, and its time left."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable

from nbfabric.config import RunConfig
from nbfabric.pool.watchdog import JOB_NAME

JOB_END_WAIT = 60.0  # seconds to wait for a cancelled job to leave the queue
# Pending reasons that never clear by waiting, and what to change.
HOPELESS = {
    "PartitionNodeLimit": "ask for fewer nodes (--num-nodes) or another partition (--partition)",
    "PartitionTimeLimit": "ask for less time (--time) or another partition (--partition)",
    "PartitionConfig": "the partition cannot run a job of this shape: ask for fewer nodes (--num-nodes), fewer ranks per node (--devices) or another partition (--partition)",
    "BadConstraints": "the job's constraints match no node: change --num-nodes, --devices or --partition",
    "InvalidAccount": "use an account Slurm knows (sacctmgr show assoc user=$USER)",
    "InvalidQOS": "use a QOS Slurm knows (sacctmgr show qos)",
    "AccountNotAllowed": "the partition does not take this account: use another partition (--partition)",
    "QOSNotAllowed": "the partition does not take this QOS: use another partition (--partition)",
}
_PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)\w*PerJob\w*$")  # e.g. QOSMaxNodePerJobLimit: above a per-job limit
ENDINGS = {
    "CANCELLED": "was cancelled by scancel",
    "TIMEOUT": "was ended by its time limit (--time)",
    "FAILED": "failed",
    "NODE_FAIL": "lost a node (NODE_FAIL)",
    "BOOT_FAIL": "could not boot its nodes (BOOT_FAIL)",
    "PREEMPTED": "was preempted",
    "OUT_OF_MEMORY": "ran out of memory",
    "DEADLINE": "missed its deadline",
    "COMPLETED": "ended",
}


class SlurmRefusal(RuntimeError):
    """Slurm refused the job, or the job can never start, or it ended; the message says why."""


@dataclass(frozen=True)
class JobState:
    """What `scontrol show job` says of a job: its state (PENDING, RUNNING, CANCELLED, ...), reason,
    whether its run time reached its time limit, and how often Slurm requeued it."""

    state: str
    reason: str
    out_of_time: bool = False
    restarts: int = 0

    def __str__(self) -> str:
        return self.state if self.reason in ("", "None") else f"{self.state} ({self.reason})"


def options(config: RunConfig, partition: str | None, time_limit: str | None) -> list[str]:
    """The sbatch options of the pool's job: one task per rank."""
    flags = [f"--nodes={config.num_nodes}", f"--ntasks-per-node={config.num_processes}"]
    return flags + ([f"--partition={partition}"] if partition else []) + ([f"--time={time_limit}"] if time_limit else [])


def batch_config(config: RunConfig, partition: str | None, time_limit: str | None, job_dir: str) -> Any:
    """ipyparallel's settings for its Slurm engine launcher: one job, one task per rank."""
    from traitlets.config import Config

    settings = Config()
    settings.SlurmEngineSetLauncher.batch_file_name = os.path.join(job_dir, "nbfabric-engines.sbatch")
    settings.SlurmEngineSetLauncher.batch_template = (
        "#!/bin/sh\n"
        f"#SBATCH --job-name={JOB_NAME}\n"  # ipyparallel puts in the cluster id
        f"#SBATCH --output={os.path.join(job_dir, 'nbfabric-slurm-%j.out')}\n"
        "#SBATCH --export=ALL\n"
        + "".join(f"#SBATCH {flag}\n" for flag in options(config, partition, time_limit))
        + "srun {program_and_args}\n"
    )
    return settings


def check_submittable(config: RunConfig, partition: str | None, time_limit: str | None) -> None:
    """SlurmRefusal naming Slurm's message when it would refuse the job (sbatch --test-only submits nothing)."""
    flags = options(config, partition, time_limit)
    tried = _slurm(["sbatch", "--test-only", *flags, "--wrap=true"])
    if tried.returncode != 0:
        said = "; ".join(line.strip() for line in tried.stderr.splitlines() if "error" in line or "failure" in line)
        raise SlurmRefusal(
            f"Slurm refuses the job ({' '.join(flags)}): {said or tried.stderr.strip()}. "
            f"Change {_what_to_change(said)}; sinfo lists the partitions and their nodes."
        )


def state(job: str) -> JobState | None:
    """The job's state and reason (None once Slurm has forgotten it, or cannot say)."""
    shown = _slurm(["scontrol", "-o", "show", "job", job])
    fields = dict(word.split("=", 1) for word in shown.stdout.split() if "=" in word) if shown.returncode == 0 else {}
    if "JobState" not in fields:
        return None
    limit = _seconds(fields.get("TimeLimit", ""))
    out_of_time = limit is not None and (_seconds(fields.get("RunTime", "")) or 0) >= limit
    restarts = fields.get("Restarts", "0")
    return JobState(fields["JobState"], fields.get("Reason", ""), out_of_time, int(restarts) if restarts.isdigit() else 0)


def requeued(now: JobState | None) -> bool:
    """Whether Slurm is putting the job back in the queue, or has, after it ran (a node failed, or it
    was preempted): it would start again, on engines nobody waits for. Its count of restarts says
    so already while the job is COMPLETING."""
    return now is not None and now.restarts > 0 and now.state in ("COMPLETING", "PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING")


def time_left(job: str) -> str:
    """The job's remaining time as squeue shows it (e.g. 0:58, 1-02:00:00, UNLIMITED), or ''."""
    listed = _slurm(["squeue", "-h", "-j", job, "-o", "%L"])
    return listed.stdout.strip() if listed.returncode == 0 else ""


def why_hopeless(job: str, now: JobState, nodes: int, partition: str | None) -> str:
    """Why this pending job can never start, and what to change ('' when it may yet start)."""
    if now.state != "PENDING":
        return ""
    if now.reason in HOPELESS or _PER_JOB_LIMIT.match(now.reason):
        change = HOPELESS.get(now.reason, "ask for less (--num-nodes, --devices, --time) or another partition")
        return f"Slurm job {job} cannot start: {now.reason}; {change}"
    available = partition_nodes(partition)
    if available and nodes > available:
        return (
            f"Slurm job {job} cannot start: it asks for {nodes} nodes, but partition {partition or '(default)'} has "
            f"{available} ({now.reason}); ask for at most {available} (--num-nodes) or use another partition"
        )
    return ""


def ending(job: str, now: JobState | None) -> str:
    """How the job ended, e.g. 'Slurm job 7 was cancelled (scancel)' ('' while it runs or waits)."""
    if now is None:
        return f"Slurm job {job} is gone"
    if requeued(now):
        reason = f"; Slurm's reason: {now.reason}" if now.reason not in ("", "None") else ""
        return f"Slurm job {job} was requeued: it lost a node or was preempted{reason}"
    if now.state in ("PENDING", "RUNNING", "CONFIGURING", "SUSPENDED", "REQUEUED", "RESIZING"):
        return ""
    if now.state == "COMPLETING":  # Slurm 22.05 shows no more until its processes are gone (up to KillWait)
        how = ENDINGS["TIMEOUT"] if now.out_of_time else ENDINGS["CANCELLED"]
        return f"Slurm job {job} {how}"
    how = ENDINGS.get(now.state, f"ended ({now.state})")
    reason = f"; Slurm's reason: {now.reason}" if now.reason not in ("", "None") and now.state != "CANCELLED" else ""
    return f"Slurm job {job} {how}{reason}"


def partition_nodes(partition: str | None) -> int:
    """How many nodes the partition (the default one when None) has; 0 when Slurm cannot say."""
    listed = _slurm(["sinfo", "-h", "-o", "%P %D"] + (["-p", partition] if partition else []))
    counts = 0
    for line in listed.stdout.splitlines() if listed.returncode == 0 else []:
        name, count = line.split()
        if partition or name.endswith("*"):  # sinfo marks the default partition with *
            counts += int(count) if count.isdigit() else 0
    return counts


def wait_for_engines(
    job: str, registered: Callable[[], int], wanted: int, *, nodes: int, partition: str | None, timeout: float
) -> None:
    """Wait until `wanted` engines have registered, showing the job's state and Slurm's reason as
    they change; SlurmRefusal when the job can never start, ends, or the timeout passes."""
    shown = _StatusLine(job)
    deadline = time.monotonic() + timeout
    while registered() < wanted:
        now = state(job)
        shown.update(now)
        cannot = ending(job, now) or (why_hopeless(job, now, nodes, partition) if now else "")
        if cannot:
            raise SlurmRefusal(cannot)
        if time.monotonic() > deadline:
            raise SlurmRefusal(f"Slurm job {job} did not start its engines within {timeout:g} s (it is {now})")
        time.sleep(1.0)
    shown.update(JobState("RUNNING", f"{wanted} engines registered"))


def wait_until_gone(jobs: list[str], timeout: float = JOB_END_WAIT) -> None:
    """Wait until the cancelled jobs have left the queue (they pass through COMPLETING)."""
    deadline = time.monotonic() + timeout
    while jobs and time.monotonic() < deadline:
        listed = _slurm(["squeue", "-h", "-o", "%i", "-j", ",".join(jobs)])
        if listed.returncode != 0 or not listed.stdout.strip():
            return
        time.sleep(0.5)


class _StatusLine:
    """The job's state, as one display a notebook updates in place, else a printed line per change."""

    def __init__(self, job: str):
        self.job, self.last, self.handle = job, "", None

    def update(self, now: JobState | None) -> None:
        text = f"Slurm job {self.job}: {now or 'unknown'}"
        if text == self.last:
            return
        self.last = text
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None or not hasattr(shell, "kernel"):
            print(text, flush=True)
            return
        from IPython.display import display

        if self.handle is None:
            self.handle = display({"text/plain": text}, raw=True, display_id=True)
        else:
            self.handle.update({"text/plain": text}, raw=True)


def _seconds(duration: str) -> int | None:
    """Seconds of a Slurm duration ([D-]HH:MM:SS, MM:SS); None for UNLIMITED or what is not one."""
    days, _, clock = duration.rpartition("-")
    parts = clock.split(":")
    if not all(part.isdigit() for part in parts) or (days and not days.isdigit()) or len(parts) > 3:
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return seconds + int(days or 0) * 86400


def _what_to_change(said: str) -> str:
    if "partition" in said.lower():
        return "--partition"
    if "time" in said.lower():
        return "--time"
    return "--num-nodes or --devices (ranks per node), or --partition"


def _slurm(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return subprocess.CompletedProcess(command, 1, "", str(error))
