"""A rank pool never outlives its kernel by accident: a kernel killed with SIGKILL takes its pool
(controller, engines, nannies, watchdog) along within 10 s; a detached pool waits for `%fabric
attach` in another kernel, its names still on the ranks, or ends itself after its idle limit."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import psutil
import pytest
from test_magic import Kernel

from nbfabric.pool.watchdog import POLL
from test_slurm import START, our_jobs, slurm  # noqa: F401 - the fixture of a two-node Slurm cluster

POOL = "%%fabric --no-widgets"
GONE_WITHIN = 10.0  # seconds from the kernel's death to the pool's end (the promise)


@pytest.fixture
def ipython_dir(tmp_path, monkeypatch):
    """The kernels of one test keep their ipyparallel profile (cluster files, pool records) apart."""
    folder = tmp_path / "ipython"
    monkeypatch.setenv("IPYTHONDIR", str(folder))
    return folder


@pytest.fixture
def kernels(tmp_path, ipython_dir):
    """Starts kernels; afterwards kills, by pid, each one and every process it started that is left."""
    started: list[tuple[Kernel, list[psutil.Process]]] = []

    def start() -> Kernel:
        kernel = Kernel(tmp_path / "none.json")
        started.append((kernel, []))
        return kernel

    def track(kernel: Kernel) -> list[psutil.Process]:
        """The kernel's processes now (recorded for cleanup)."""
        processes = psutil.Process(kernel.pid).children(recursive=True)
        next(found for k, found in started if k is kernel).extend(processes)
        return processes

    start.track = track
    yield start
    for kernel, processes in started:
        try:
            processes += psutil.Process(kernel.pid).children(recursive=True)
        except psutil.Error:
            pass
        for process in processes:
            if running(process):
                process.kill()
        kernel.client.stop_channels()
        kernel.manager.shutdown_kernel(now=True)


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def seconds_until_gone(processes: list[psutil.Process], since: float, limit: float = 15.0) -> float:
    """Seconds from `since` until none of `processes` runs; fails, naming them, after `limit`."""
    while any(map(running, processes)):
        assert time.monotonic() - since < limit, f"still running after {limit} s: {[p.pid for p in processes if running(p)]}"
        time.sleep(0.05)
    return time.monotonic() - since


def kill(kernel: Kernel) -> float:
    os.kill(kernel.pid, signal.SIGKILL)
    return time.monotonic()


def start_pool(kernel: Kernel, flags: str = "") -> dict:
    """Start a pool of 2 local engines; what the cell showed."""
    out = kernel.run(f"%fabric start --devices=2 {flags}", timeout=180)
    assert out["error"] is None and "rank 1: node" in out["stdout"], out
    return out


def pool_files(ipython_dir) -> list[str]:
    """Cluster files, connection files, pool records and process logs left in the profile (not the
    engine list the controller saves as `log/engines<id>.json` when it stops, as after any stop)."""
    profile = ipython_dir / "profile_default"
    files = [p.name for folder in ("security", "log") if (profile / folder).exists() for p in (profile / folder).iterdir()]
    return sorted(name for name in files if not name.startswith("engines"))


def describe(processes: list[psutil.Process]) -> list[str]:
    return [" ".join(p.cmdline()) for p in processes]


def test_a_killed_kernel_takes_its_whole_pool_along_within_10_s(kernels, ipython_dir):
    kernel = kernels()
    start_pool(kernel)
    processes = kernels.track(kernel)
    commands = describe(processes)
    assert sum("ipyparallel.engine.nanny" in c for c in commands) == 2 and sum(c.endswith("ipyparallel.engine") for c in commands) == 2
    assert any("ipyparallel.controller" in c for c in commands) and sum("watchdog.py" in c for c in commands) == 1
    took = seconds_until_gone(processes, since=kill(kernel))
    print(f"\nkernel killed -> all {len(processes)} processes of its pool gone in {took:.1f} s")
    assert took < GONE_WITHIN
    assert pool_files(ipython_dir) == []


@pytest.mark.parametrize("after", [0.4, 0.7])
def test_an_interrupted_start_leaves_no_process_behind(kernels, ipython_dir, after):
    """ipyparallel starts the engines on a thread of its own: the start waits for them (and the
    watchdog) before it takes the interrupt, and then ends them all."""
    kernel = kernels()
    made: list[psutil.Process] = []
    stop = threading.Event()

    def record() -> None:  # every process the start makes, also one that lives a moment
        while not stop.is_set():
            made.extend(process for process in kernels.track(kernel) if process not in made)
            time.sleep(0.02)

    watcher = threading.Thread(target=record)
    watcher.start()
    try:
        out = kernel.run(
            f"import os, signal, threading\nthreading.Timer({after}, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
            "%fabric start --devices=2",
            timeout=180,
        )
    finally:
        stop.set()
        watcher.join()
    assert (out["error"] or {}).get("ename") == "KeyboardInterrupt", out
    assert out["error"]["traceback"] == ["KeyboardInterrupt: the rank pool's start was stopped; nothing of it is left running"], out
    assert "no rank pool" in kernel.run("%fabric pool")["stdout"]
    assert made, "the start made no process before the interrupt"
    seconds_until_gone(made, since=time.monotonic(), limit=10)
    assert pool_files(ipython_dir) == []


def of_profile(ipython_dir) -> list[psutil.Process]:
    """Every process of this user that ipyparallel started for a cluster of this test's profile
    (its environment names the profile), found without the kernel that started it."""
    profile = str(ipython_dir / "profile_default")
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("IPP_PROFILE_DIR") == profile and running(process):
                found.append(process)
        except psutil.Error:
            pass
    return found


@pytest.mark.parametrize("after", [0.5, 1.0, 1.6])
def test_a_kernel_killed_while_its_pool_starts_leaves_nothing_within_10_s(kernels, ipython_dir, after):
    """The controller and engines are being started (or have just been) when the kernel dies: the
    watchdog, started first, ends them all, and their files."""
    kernel = kernels()
    made: list[psutil.Process] = []
    kernel.client.execute(
        f"import os, signal, threading\nthreading.Timer({after}, os.kill, (os.getpid(), signal.SIGKILL)).start()\n"
        "%fabric start --devices=2"
    )
    while running(psutil.Process(kernel.pid)):
        made.extend(process for process in kernels.track(kernel) if process not in made)
        time.sleep(0.02)
    died = time.monotonic()
    made.extend(process for process in of_profile(ipython_dir) if process not in made)
    try:
        took = seconds_until_gone(made, since=died, limit=GONE_WITHIN + 5)
        assert of_profile(ipython_dir) == []
    finally:
        for process in of_profile(ipython_dir):
            process.kill()
    print(f"\nkernel killed {after} s into %fabric start -> {len(made)} processes gone in {took:.1f} s")
    assert took < GONE_WITHIN
    deadline = time.monotonic() + 5
    while pool_files(ipython_dir) and time.monotonic() < deadline:  # the watchdog ends the processes, then removes files
        time.sleep(0.1)
    assert pool_files(ipython_dir) == []


def test_stop_pool_ends_what_a_killed_controller_left(kernels, ipython_dir):
    """The controller's schedulers outlive it (reparented), out of reach of ipyparallel's stop: the
    watchdog, which has seen them, ends them when the pool is stopped."""
    kernel = kernels()
    start_pool(kernel)
    processes = kernels.track(kernel)
    controller = next(p for p in processes if "ipyparallel.controller" in " ".join(p.cmdline()) and p.ppid() == kernel.pid)
    assert controller.children(recursive=True), "the controller started no schedulers"
    time.sleep(3 * POLL)  # the watchdog's looks at the cluster
    controller.kill()
    assert kernel.run("%fabric stop-pool", timeout=120)["error"] is None
    seconds_until_gone(processes, since=time.monotonic(), limit=15)
    assert pool_files(ipython_dir) == []


def _controller_and_schedulers(kernel, kernels) -> list[psutil.Process]:
    processes = kernels.track(kernel)
    controller = next(p for p in processes if "ipyparallel.controller" in " ".join(p.cmdline()) and p.ppid() == kernel.pid)
    return [controller, *controller.children(recursive=True)]


def test_a_killed_controller_fails_the_running_cell_within_seconds_saying_so(kernels, ipython_dir):
    """Every result comes through the controller: without it the cell would wait until the engines
    give up on it (more than a minute), and then blame them."""
    kernel = kernels()
    start_pool(kernel)
    killed: list[float] = []

    def kill_the_controller(outputs: dict) -> None:
        if not killed and "working" in outputs["stdout"]:
            for process in _controller_and_schedulers(kernel, kernels):
                process.kill()
            killed.append(time.monotonic())

    out = kernel.run(f"{POOL}\nimport time\nprint('working', flush=True)\ntime.sleep(120)", timeout=180, on_output=kill_the_controller)
    took = time.monotonic() - killed[0]
    shown = out["stderr"] + "\n".join(out["error"]["traceback"] if out["error"] else [])
    print(f"\ncontroller killed under a running cell -> the cell failed {took:.1f} s later")
    assert out["error"] is not None and took < 10, (took, out)
    assert "the pool's controller (pid" in shown and "ended" in shown, shown
    assert "the rank pool is broken: the pool's controller (pid" in kernel.run("%fabric pool")["stdout"] + kernel.run(f"{POOL}\n1")["stderr"]
    assert kernel.run("%fabric stop-pool", timeout=60)["error"] is None
    seconds_until_gone(kernels.track(kernel), since=time.monotonic(), limit=15)


def test_pool_shows_a_pool_whose_controller_or_engine_is_gone_as_broken(kernels, ipython_dir):
    kernel = kernels()
    start_pool(kernel)
    controller = _controller_and_schedulers(kernel, kernels)
    for process in controller:
        process.kill()
    seconds_until_gone(controller, since=time.monotonic())
    shown = kernel.run("%fabric pool")["stdout"]
    assert "no rank pool: the pool's controller (pid" in shown, shown
    assert "the rank pool is broken: the pool's controller" in kernel.run(f"{POOL}\n1")["stderr"]
    assert kernel.run("%fabric stop-pool", timeout=60)["error"] is None

    start_pool(kernel)
    engine = next(p for p in kernels.track(kernel) if p.cmdline()[-1:] == ["ipyparallel.engine"] or " ".join(p.cmdline()).endswith("ipyparallel.engine"))
    engine.kill()
    seconds_until_gone([engine], since=time.monotonic())
    assert "no rank pool: the engine of rank" in kernel.run("%fabric pool")["stdout"]
    assert kernel.run("%fabric stop-pool", timeout=60)["error"] is None


def test_a_gracefully_shut_down_kernel_leaves_no_pool_and_no_watchdog(kernels, ipython_dir):
    kernel = kernels()
    start_pool(kernel)
    processes = kernels.track(kernel)
    since = time.monotonic()
    kernel.manager.shutdown_kernel(now=False)
    took = seconds_until_gone(processes, since=since)
    print(f"\nkernel shut down -> its pool gone in {took:.1f} s")
    assert pool_files(ipython_dir) == []


def test_a_detached_pool_outlives_its_kernel_and_is_attached_with_its_names(kernels, ipython_dir):
    first = kernels()
    out = start_pool(first, "--detach")
    assert "detached: it outlives this kernel" in out["stdout"] and "3600 s" in out["stdout"]
    bound = first.run(f"{POOL} --no-return\nkept = 40 + fabric.global_rank")
    assert bound["error"] is None, bound
    processes = kernels.track(first)
    kill(first)
    time.sleep(4)  # several of the watchdog's looks at the dead kernel
    assert all(map(running, processes)), describe([p for p in processes if not running(p)])

    second = kernels()
    out = second.run("%fabric attach", timeout=120)
    assert out["error"] is None and "rank pool of 2 ranks (local engines" in out["stdout"], out
    out = second.run(f"{POOL}\nprint('kept', kept)\nfabric.all_reduce(torch.tensor(1.0), reduce_op='sum').item()")
    assert out["error"] is None and "[rank 0] kept 40" in out["stdout"] and "[rank 1] kept 41" in out["stdout"], out
    assert out["result"] == "2.0"
    assert "is held by a running kernel (pid" in kernels().run("%fabric attach")["stderr"]  # by `second` now

    since = time.monotonic()
    assert "stopped: no engine is left" in second.run("%fabric stop-pool", timeout=60)["stdout"]
    took = seconds_until_gone(processes, since=since)
    print(f"\nstop-pool in the attached kernel -> the pool and its watchdog gone in {took:.1f} s")
    assert second.children() == []
    assert pool_files(ipython_dir) == []


def test_a_detached_pool_nobody_attaches_to_ends_after_its_idle_limit(kernels, ipython_dir):
    kernel = kernels()
    start_pool(kernel, "--detach --idle-timeout=3")
    processes = kernels.track(kernel)
    took = seconds_until_gone(processes, since=kill(kernel), limit=20)
    print(f"\ndetached pool, idle limit 3 s, kernel killed -> pool gone in {took:.1f} s")
    assert 3 <= took < 3 + GONE_WITHIN
    assert pool_files(ipython_dir) == []


def test_lifetime_flags_are_checked_before_anything_starts(kernels):
    kernel = kernels()
    out = kernel.run("%fabric start --devices=2 --idle-timeout=60")
    assert "--idle-timeout is how long a detached pool waits for a kernel; use it with --detach" in out["stderr"], out
    out = kernel.run("%fabric start --devices=2 --detach --idle-timeout=0")
    assert "--idle-timeout=0.0 is not valid" in out["stderr"], out
    out = kernel.run("%fabric attach")
    assert "there is no detached rank pool to attach to (%fabric start --detach makes one)" in out["stderr"], out
    assert kernel.children() == []


def test_a_killed_kernel_cancels_its_pools_slurm_job(slurm, kernels, ipython_dir):  # noqa: F811 - the fixture
    kernel = kernels()
    out = kernel.run("%fabric start --engines=slurm --num-nodes=2 --devices=1 --controller-ip=127.0.0.1", timeout=240)
    assert out["error"] is None and "node n2" in out["stdout"], out
    (record,) = (ipython_dir / "profile_default" / "security").glob("nbfabric-pool-*.json")
    job_name = record.stem.replace("nbfabric-pool-", "nbfabric-")  # the job is named after the cluster id
    (job,) = [line for line in our_jobs(job_name) if line.split()[1] == job_name]
    processes = kernels.track(kernel)
    since = kill(kernel)
    took = seconds_until_gone(processes, since=since)
    while job in our_jobs("nbfabric-"):
        assert time.monotonic() - since < 15, f"the pool's Slurm job is still queued: {job}"
        time.sleep(0.2)
    print(f"\nkernel killed -> its pool's processes here gone in {took:.1f} s, its Slurm job in {time.monotonic() - since:.1f} s")
    assert time.monotonic() - since < GONE_WITHIN


def test_a_kernel_killed_while_its_slurm_pool_starts_cancels_the_job(slurm, kernels, ipython_dir):  # noqa: F811 - the fixture
    """The kernel dies the moment sbatch has submitted the job, before the cluster's file names it,
    and the job waits for nodes that another job holds: the watchdog finds it by its name and
    cancels it."""
    held = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--job-name=hold-nodes", "--output=/dev/null", "--wrap", "sleep 300"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()
    names: list[str] = []  # the pool's job, by the cluster id in its record
    try:
        _killed_as_its_job_is_submitted(kernels, ipython_dir, names)
    finally:
        subprocess.run(["scancel", held], timeout=30)
        if names:  # a job left by a failure here would hold the nodes for the next test
            subprocess.run(["scancel", f"--name={names[0]}"], timeout=30)


def _killed_as_its_job_is_submitted(kernels, ipython_dir, names: list[str]) -> None:
    kernel = kernels()
    kernel.client.execute(
        "import os, signal\n"
        "from ipyparallel.cluster import launcher\n"
        "run_command = launcher.SlurmEngineSetLauncher._run_command\n"
        "def die_once_submitted(self, command, **kwargs):\n"
        "    output = run_command(self, command, **kwargs)\n"
        "    if command[0] == 'sbatch':\n"
        "        print(output, flush=True)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return output\n"
        "launcher.SlurmEngineSetLauncher._run_command = die_once_submitted\n"
        f"{START.lstrip()}"
    )
    made: list[psutil.Process] = []
    deadline = time.monotonic() + 120
    while running(psutil.Process(kernel.pid)):
        assert time.monotonic() < deadline, "the kernel was never killed: sbatch was not run through SlurmEngineSetLauncher._run_command"
        made.extend(process for process in kernels.track(kernel) if process not in made)
        names[:] = names or [record.stem.replace("nbfabric-pool-", "nbfabric-") for record in (ipython_dir / "profile_default" / "security").glob("nbfabric-pool-*.json")]
        time.sleep(0.02)
    died = time.monotonic()
    took = seconds_until_gone(made, since=died)
    assert names, "the pool's record was never written"
    while our_jobs(names[0]):
        assert time.monotonic() - died < GONE_WITHIN, f"the pool's Slurm job is still queued: {our_jobs(names[0])}"
        time.sleep(0.2)
    print(f"\nkernel killed as its job was submitted -> its processes here gone in {took:.1f} s, the job in {time.monotonic() - died:.1f} s")
    assert took < GONE_WITHIN
