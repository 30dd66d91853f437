"""Shared fixtures: a check that a test leaves no process, thread, fd, file or variable behind."""

from __future__ import annotations

import glob
import os
import tempfile
import threading
import time

import psutil
import pytest

from nbfabric.launcher.processes import wait_for_reaping


def _snapshot(workdir: str) -> dict:
    me = psutil.Process()
    return {
        "children": sorted(p.pid for p in me.children(recursive=True)),
        "threads": threading.active_count(),
        "fds": sorted(os.listdir(f"/proc/{os.getpid()}/fd")),
        "environ": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},
        "workdirs": sorted(glob.glob(os.path.join(workdir, "nbfabric-*"))),
    }


@pytest.fixture
def no_leaks(tmp_path_factory):
    """Fail the test if it leaves child processes, threads, open fds, env changes or work dirs."""
    workdir = str(tmp_path_factory.mktemp("launches"))
    saved_tempdir, tempfile.tempdir = tempfile.tempdir, workdir
    assert wait_for_reaping(5), "the ranks of an earlier test are still exiting"
    before = _snapshot(workdir)
    try:
        yield
    finally:
        tempfile.tempdir = saved_tempdir
    deadline = time.monotonic() + 5
    after = _snapshot(workdir)
    while after != before and time.monotonic() < deadline:
        time.sleep(0.05)
        after = _snapshot(workdir)
    for pid in set(after["children"]) - set(before["children"]):
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    for key in before:
        assert after[key] == before[key], f"leaked {key}: before={before[key]!r} after={after[key]!r}"
