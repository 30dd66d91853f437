"""Shared fixtures: a check that a test leaves no process, thread, fd, file or variable behind, and
`missing_service`, which skips a test whose outside service is absent, or fails it in CI."""

from __future__ import annotations

import glob
import os
import tempfile
import threading
import time

import psutil
import pytest

from nbfabric.launcher.processes import wait_for_reaping


def _settle_process_wide_state() -> None:
    """What libraries make once per process, at first use, and keep for good, made now: the leak
    check then does not blame the first test that happens to use them."""
    from jupyter_core.utils import ensure_event_loop
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    from tqdm import tqdm

    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # what Lightning sets when it is first imported
    ensure_event_loop()  # jupyter_client's blocking calls run on this thread's loop (an epoll fd, a socket pair)
    cache_dir()  # torch sets TORCHINDUCTOR_CACHE_DIR at its first compile or optimizer step
    tqdm.monitor_interval = 0  # no monitor thread, which the first progress bar would start and keep


_settle_process_wide_state()


def _snapshot(workdir: str) -> dict:
    me = psutil.Process()
    return {
        "children": sorted(p.pid for p in me.children(recursive=True)),
        "threads": sorted(f"{thread.name} ({thread.ident})" for thread in threading.enumerate()),
        "fds": sorted(os.listdir(f"/proc/{os.getpid()}/fd")),
        "environ": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},
        "workdirs": sorted(glob.glob(os.path.join(workdir, "nbfabric-*"))),
    }


def pytest_configure(config):
    # a skipped test is listed with its reason in the short summary (-rs), as the GPU tests are where
    # no CUDA GPU is, and the Slurm and browser tests outside CI: a skip is never silent
    if not set("saAN") & set(config.option.reportchars):
        config.option.reportchars += "s"
    config.addinivalue_line(
        "markers",
        "known_leak(*kinds, reason): no_leaks does not check these kinds (children, threads, fds, environ, "
        "workdirs) for this test; the reason names what outside nbfabric keeps them",
    )


def in_ci() -> bool:
    """CI sets CI=true (as `.ci/run` runs there): every service the suite needs must be there."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_service(reason: str) -> None:
    """A service a test needs (a Slurm cluster, chromium) is absent: outside CI the test skips with
    `reason` (listed in the short summary); in CI it fails, since `.ci/run` provides the service and
    a skip would hide that it did not."""
    if in_ci():
        pytest.fail(f"CI=true, but {reason}", pytrace=False)
    pytest.skip(reason)


def _fd_target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/{os.getpid()}/fd/{fd}")
    except OSError:
        return "?"


def _leaks(before: dict, after: dict) -> dict:
    """What `after` has that `before` had not: new child processes (children that ended are no
    leak), threads and fds, and any change to the environment or work dirs."""
    found = {}
    for key in ("children", "threads", "workdirs"):
        new = sorted(set(after[key]) - set(before[key]))
        if new:
            found[key] = new
    new_fds = sorted(set(after["fds"]) - set(before["fds"]), key=int)
    if new_fds:
        found["fds"] = {fd: _fd_target(fd) for fd in new_fds}
    env_before, env_after = before["environ"], after["environ"]
    changed = {name: (env_before.get(name), env_after.get(name)) for name in set(env_before) | set(env_after) if env_before.get(name) != env_after.get(name)}
    if changed:
        found["environ (before, after)"] = changed
    return found


@pytest.fixture
def no_leaks(tmp_path_factory, request):
    """Fail the test if it leaves child processes, threads, open fds, env changes or work dirs.

    Modules that start ranks apply it to every test (`pytestmark = pytest.mark.usefixtures("no_leaks")`),
    so a leak fails the test that made it. It costs nothing when nothing is left: it waits only
    while something differs (ranks still exiting), at most 5 s.
    """
    known = request.node.get_closest_marker("known_leak")
    if known is not None:
        assert known.kwargs.get("reason"), "a known_leak marker says why: reason=..."
    unchecked = set(known.args) if known is not None else set()
    workdir = str(tmp_path_factory.mktemp("launches"))
    saved_tempdir, tempfile.tempdir = tempfile.tempdir, workdir
    assert wait_for_reaping(5), "the ranks of an earlier test are still exiting"
    before = _snapshot(workdir)
    try:
        yield
    finally:
        tempfile.tempdir = saved_tempdir

    def found() -> dict:
        return {kind: leak for kind, leak in _leaks(before, _snapshot(workdir)).items() if kind.split()[0] not in unchecked}

    deadline = time.monotonic() + 5
    leaks = found()
    while leaks and time.monotonic() < deadline:
        time.sleep(0.05)
        leaks = found()
    for pid in leaks.get("children", []):
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    assert not leaks, f"leaked: {leaks}"
