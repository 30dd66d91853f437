"""A real Jupyter kernel for tests: started with a private settings file, closed with its ranks."""

from __future__ import annotations

import os
import signal
import time

import psutil
from jupyter_client.manager import start_new_kernel


class KernelProcess:
    """Starts a kernel whose nbfabric settings file is `settings_file`; `close` kills what it left."""

    def __init__(self, settings_file):
        env = {**os.environ, "NBFABRIC_CONFIG": str(settings_file)}
        env.pop("PYTEST_CURRENT_TEST", None)  # ipykernel then shows output written to its file descriptors, as in a notebook
        self.manager, self.client = start_new_kernel(
            kernel_name="python3", extra_arguments=["--HistoryManager.enabled=False"], env=env
        )
        self.pid = self.manager.provisioner.pid

    def children(self) -> list[int]:
        return [p.pid for p in psutil.Process(self.pid).children(recursive=True)]

    def interrupt(self) -> None:
        """What Jupyter's interrupt button does to a Python kernel: SIGINT to its process group (the
        same as `manager.interrupt_kernel()`, without the event loop that call leaves open in this process)."""
        pgid = self.manager.provisioner.pgid
        if pgid:
            os.killpg(pgid, signal.SIGINT)
        else:
            os.kill(self.pid, signal.SIGINT)

    def assert_no_ranks_left(self, grace: float = 5) -> None:
        """Fail unless every process the kernel started is gone within `grace` seconds."""
        deadline = time.monotonic() + grace
        while self.children() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.children() == []

    def close(self) -> None:
        for pid in self.children():
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:  # it ended since it was listed
                pass
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)
