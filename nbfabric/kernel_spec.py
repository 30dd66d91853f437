"""The "Python (nbfabric)" Jupyter kernel: loads the extension at start, in a fork-safe environment."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager

DISPLAY_NAME = "Python (nbfabric)"
# Count GPUs through NVML, so that asking how many there are leaves CUDA uninitialised and forking safe.
KERNEL_ENV = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
# Loaded before the first cell, nbfabric sees what initialises CUDA, and a refused fork names it.
LOAD_EXTENSION = "--InteractiveShellApp.extensions=nbfabric"


def install_kernel(name: str = "nbfabric", *, user: bool = False, prefix: str | None = None) -> str:
    """Register the kernel as `name` (for this user, under `prefix`, or system-wide); return its directory."""
    staging = tempfile.mkdtemp(prefix="nbfabric-kernel-")
    try:
        spec = write_kernel_spec(
            Path(staging, name),
            overrides={"display_name": DISPLAY_NAME, "env": KERNEL_ENV},
            extra_arguments=[LOAD_EXTENSION],
            python_arguments=["-Xfrozen_modules=off"],  # as ipykernel does, for its debugger
        )
        return KernelSpecManager().install_kernel_spec(spec, kernel_name=name, user=user, prefix=prefix)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
