"""A script's rank leaves its process group only once gloo's worker threads have let go of the last
collective: a worker that releases a tensor after the interpreter began to shut down aborts the
rank ("terminate called without an active exception"), which mpiexec, pinning each rank to a core,
made happen in about one run in seven of `test_ranks_under_mpiexec_join_one_run`."""

from __future__ import annotations

import ctypes
import hashlib
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nbfabric.strategies.ddp import GLOO_WORKER_NAME, let_gloo_workers_finish

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names and states come from Linux's /proc")


@linux_only
def test_the_threads_the_wait_watches_are_the_ones_gloo_runs_collectives_on():
    code = textwrap.dedent(
        """
        import os, torch, torch.distributed as dist
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        dist.all_reduce(torch.ones(1))
        names = []
        for thread in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{thread}/comm") as file:
                names.append(file.read().strip())
        print(",".join(names))
        dist.destroy_process_group()
        """
    )
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert GLOO_WORKER_NAME in finished.stdout.split(","), finished.stdout


@linux_only
def test_leaving_waits_while_a_gloo_worker_still_runs():
    named = threading.Event()
    done = threading.Event()

    def worker() -> None:  # stands for a gloo worker: named as torch names them, busy without the GIL
        ctypes.CDLL(None).prctl(15, GLOO_WORKER_NAME.encode())  # PR_SET_NAME
        named.set()
        hashlib.sha256(bytes(300_000_000)).digest()  # hashing releases the GIL
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        named.wait(10)
        started = time.monotonic()
        let_gloo_workers_finish(limit=30)
        assert done.is_set(), "the wait returned while the worker still ran"
        assert time.monotonic() - started < 20
    finally:
        thread.join()


def test_with_no_gloo_worker_running_the_wait_ends_well_before_its_limit():
    started = time.monotonic()
    let_gloo_workers_finish(limit=10)
    assert time.monotonic() - started < 5
