"""A rank pool's watchdog: a small process outside the kernel that ends the pool once its kernel is
gone (a detached pool: once no kernel has held it for its idle limit).

The kernel writes the pool's record (``<profile>/security/nbfabric-pool-<cluster id>.json``: its
cluster file, its owner kernel's pid and start time, detached or not) and starts
``python watchdog.py RECORD`` in a session of its own, before the cluster's processes, so that a
kernel killed by SIGKILL, even while they start, takes no watchdog with it. The watchdog runs as a
script (no nbfabric or torch import) and exits when the record is removed: the pool was stopped.
This module imports nothing of nbfabric either.

The cluster's processes here are found through its file and, for those not yet named in it, by the
cluster id that ipyparallel puts in their environment; its Slurm job by its file or its name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

POLL = 1.0  # seconds between looks at the kernel
IDLE_TIMEOUT = 3600.0  # seconds a detached pool waits for a kernel to attach before it ends itself
RECORD_PREFIX = "nbfabric-pool-"
JOB_NAME = "nbfabric-{cluster_id}"  # the pool's Slurm job (slurm_job.batch_config)


# ----------------------------------------------------------------- the kernel's side
def watch(cluster: Any, *, engines: str, accelerator: str, detach: bool, idle_timeout: float) -> tuple[str, subprocess.Popen]:
    """Record this kernel as the owner of the ipyparallel `cluster`, not started yet, and start its
    watchdog: the record's path and the watchdog process. `started` says when the cluster is."""
    record_file = os.path.join(cluster.profile_dir, "security", f"{RECORD_PREFIX}{cluster.cluster_id}.json")
    _write(record_file, {
        "cluster_id": cluster.cluster_id,
        "cluster_file": cluster.cluster_file,
        "engines": engines,
        "accelerator": accelerator,
        "detach": detach,
        "idle_timeout": idle_timeout,
        "owner": _this_process(),
        "started": False,
    })
    log = _log_file(record_file)
    with open(log, "ab") as errors, open(os.devnull, "rb") as nothing:
        process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), record_file],
            stdin=nothing, stdout=errors, stderr=errors, start_new_session=True, close_fds=True,
        )
    return record_file, process


def started(record_file: str) -> None:
    """The cluster's controller and engines are started (its file names them): from now on, a
    cluster file that is gone means a stopped cluster."""
    record = _read(record_file)
    if record is not None:
        _write(record_file, {**record, "started": True})


def detached_pools(profile_dir: str) -> list[tuple[str, dict]]:
    """The detached pools recorded in this ipyparallel profile whose cluster is still there: (record
    file, record), with ``record["held"]`` saying whether a running kernel holds it."""
    folder = os.path.join(profile_dir, "security")
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        record = _read(path) if name.startswith(RECORD_PREFIX) and name.endswith(".json") else None
        if record is not None and record["detach"] and os.path.exists(record["cluster_file"]):
            found.append((path, {**record, "held": _alive(record["owner"])}))
    return found


def adopt(record_file: str) -> None:
    """Make this kernel the owner of a detached pool (its watchdog stops counting idle time)."""
    record = _read(record_file)
    if record is not None:
        _write(record_file, {**record, "owner": _this_process()})


def forget(record_file: str, watchdog: subprocess.Popen | None = None) -> None:
    """The pool was stopped: remove its record (its watchdog exits) and end `watchdog` if this kernel started it."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(record_file)
    if watchdog is not None:
        watchdog.terminate()
        watchdog.wait()


# ----------------------------------------------------------------- the watchdog
def main(record_file: str) -> None:
    """Watch the pool's owner kernel every POLL seconds; end the pool when it is gone (a detached
    pool: gone for its idle limit) or its cluster is. When a kernel stops the pool (SIGTERM, or its
    record removed), end what that stop left running, then exit: a controller that was killed leaves
    its schedulers, which ipyparallel's stop no longer reaches."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    seen = _Seen()
    owner_gone_at = None
    last: dict | None = None  # the record as last read (the kernel's stop removes it)
    try:
        while (record := _read(record_file)) is not None:
            last = record
            try:
                cluster = _read(record["cluster_file"])
            except ValueError:  # ipyparallel is rewriting it
                time.sleep(POLL)
                continue
            if cluster is not None:
                seen.remember(cluster)
            if _alive(record["owner"]):
                owner_gone_at = None
            elif owner_gone_at is None:
                owner_gone_at = time.monotonic()
            started = record.get("started", True)  # before then, no cluster file is no stop
            limit = record["idle_timeout"] if record["detach"] and started else 0.0
            if (started and cluster is None) or (owner_gone_at is not None and time.monotonic() - owner_gone_at >= limit):
                _end(record, seen)
                forget(record_file)
                return
            time.sleep(POLL)
        _end_leftovers(last, seen)
    except SystemExit:
        _end_leftovers(last, seen)
        raise
    finally:
        log = _log_file(record_file)
        if os.path.exists(log) and os.path.getsize(log) == 0:
            os.remove(log)


@dataclass
class _Seen:
    """What the cluster's file has named so far: its processes here (with what they started: the
    controller's schedulers, nannies, MPI ranks), its Slurm jobs and its log files."""

    processes: dict[int, psutil.Process] = field(default_factory=dict)  # psutil refuses to signal a reused pid
    jobs: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)

    def remember(self, cluster: dict) -> None:
        states = [(cluster.get("controller") or {}).get("state") or {}]
        for engine_set in (cluster.get("engines") or {}).get("sets", {}).values():
            states += [engine_set, *engine_set.get("engines", {}).values()]
        for state in states:
            if state.get("job_id"):
                self.jobs.add(str(state["job_id"]))
            if state.get("output_file"):
                self.files.add(state["output_file"])
            with contextlib.suppress(psutil.Error, ValueError):
                top = psutil.Process(state.get("pid", -1))
                for process in (top, *top.children(recursive=True)):
                    self.processes.setdefault(process.pid, process)


def _end(record: dict, seen: _Seen) -> None:
    """End the cluster: TERM to each of its processes here, KILL to those left after a moment (an
    engine whose kernel died may ignore TERM), scancel of its Slurm job, ipyparallel's stop for
    engines elsewhere (SSH), and its files removed."""
    _end_processes(seen, record["cluster_id"])
    jobs = set(seen.jobs)
    if record["engines"] == "slurm":  # and one that the kernel may not have seen submitted
        jobs |= _jobs_named(JOB_NAME.format(cluster_id=record["cluster_id"]))
    if jobs and shutil.which("scancel"):
        subprocess.run(["scancel", *sorted(jobs)], capture_output=True, timeout=60)
    try:
        import ipyparallel

        ipyparallel.Cluster.from_file(record["cluster_file"], log_level=logging.CRITICAL).stop_cluster_sync()
    except FileNotFoundError:
        pass  # stopped already
    except Exception as error:  # noqa: BLE001 - said in the log
        print(f"nbfabric watchdog: stopping cluster {record['cluster_id']} failed: {error!r}", file=sys.stderr)
    _remove_files(record, seen)


def _end_leftovers(record: dict | None, seen: _Seen) -> None:
    """After a kernel stopped the pool: its processes and files that the stop left."""
    _end_processes(seen, record["cluster_id"] if record is not None else "")
    if record is not None:
        _remove_files(record, seen)


def _remove_files(record: dict, seen: _Seen) -> None:
    """The cluster's file, its controller's connection files and its processes' logs."""
    connection = os.path.join(os.path.dirname(record["cluster_file"]), f"ipcontroller-{record['cluster_id']}")
    for path in [record["cluster_file"], f"{connection}-client.json", f"{connection}-engine.json", *seen.files]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _end_processes(seen: _Seen, cluster_id: str) -> None:
    """TERM to each of the cluster's processes here that still runs, KILL to those left after a
    moment; before each, those its file has not named are looked for by `cluster_id`."""
    for ask in ("terminate", "kill"):
        for process in _started_for(cluster_id):
            seen.processes.setdefault(process.pid, process)
        left = [process for process in seen.processes.values() if _running(process)]
        for process in left:
            with contextlib.suppress(psutil.Error):
                getattr(process, ask)()
        deadline = time.monotonic() + 2
        while any(map(_running, left)) and time.monotonic() < deadline:  # not wait_procs: a zombie never leaves
            time.sleep(0.05)


def _started_for(cluster_id: str) -> list[psutil.Process]:
    """This user's processes that ipyparallel started for the cluster (and what they started):
    their environment holds its id."""
    if not cluster_id:
        return []
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and process.environ().get("IPP_CLUSTER_ID") == cluster_id:
                found.append(process)
    return found


def _jobs_named(name: str) -> set[str]:
    """The ids of this user's Slurm jobs called `name` (none where Slurm is not installed)."""
    if not shutil.which("squeue"):
        return set()
    try:
        listed = subprocess.run(["squeue", "--me", "--noheader", f"--name={name}", "--format=%i"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(listed.stdout.split()) if listed.returncode == 0 else set()


def _alive(owner: list) -> bool:
    """Whether the kernel (pid, start time) still runs: not ended, not a zombie, its pid not reused."""
    pid, started = owner
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 0.005 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _this_process() -> list:
    return [os.getpid(), psutil.Process().create_time()]


def _log_file(record_file: str) -> str:
    """Where the watchdog says what went wrong: the profile's log folder (removed when empty)."""
    profile_dir = os.path.dirname(os.path.dirname(record_file))
    os.makedirs(os.path.join(profile_dir, "log"), exist_ok=True)
    return os.path.join(profile_dir, "log", os.path.basename(record_file).replace(".json", ".log"))


def _read(path: str) -> dict | None:
    """The JSON file's content, None if there is no file (ValueError while it is being written)."""
    try:
        with open(path) as file:
            return json.load(file)
    except FileNotFoundError:
        return None


def _write(path: str, record: dict) -> None:
    """Write atomically: the watchdog may read it at any time."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w") as file:
        json.dump(record, file)
    os.replace(f"{path}.tmp", path)


if __name__ == "__main__":
    main(sys.argv[1])
