"""`nbfabric env`: what a bug report needs."""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata

from nbfabric.config import RunConfig
from nbfabric.devices import describe_hardware
from nbfabric.user_config import config_path, load_defaults

_REPORTED_VARIABLES = ("CUDA_", "NCCL_", "GLOO_", "PYTORCH_", "TORCH_", "NBFABRIC_", "OMP_", "SLURM_JOB_ID", "SLURM_PROCID")
_PACKAGES = ("nbfabric", "torch", "ipykernel", "ipywidgets", "ipyparallel", "lightning", "accelerate", "deepspeed", "transformers")
_LAUNCHERS = {"slurm": ("sbatch", "srun", "squeue"), "mpi": ("mpiexec",)}


def environment_report(config_file: str | None = None) -> list[str]:
    """What a bug report needs: versions, the hardware found (CUDA left uninitialised), the settings in effect."""
    import platform

    import torch

    lines = [f"python: {sys.version.split()[0]} ({sys.executable})", f"platform: {platform.platform()}"]
    lines += [f"{package}: {_version(package)}" for package in _PACKAGES]
    lines.append(f"torch built for CUDA: {torch.version.cuda or 'no'}")
    lines += [f"{what}: {_found(commands)}" for what, commands in _LAUNCHERS.items()]
    lines.append(f"hardware: {describe_hardware()}")
    lines += _settings_report(config_file)
    variables = sorted(name for name in os.environ if name.startswith(_REPORTED_VARIABLES))
    lines += [f"{name}={os.environ[name]}" for name in variables]
    return lines


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _found(commands: tuple[str, ...]) -> str:
    """Where the commands are, or which are missing."""
    import shutil

    missing = [command for command in commands if shutil.which(command) is None]
    if missing:
        return f"no ({', '.join(missing)} not on PATH)"
    return f"yes ({shutil.which(commands[0])})"


def _settings_report(config_file: str | None) -> list[str]:
    path = config_file or config_path()
    try:
        saved = load_defaults(path)
        flags = RunConfig.resolve(**saved).as_flags()
    except ValueError as error:
        return [f"settings file: {path}", f"settings in effect: none, the file is broken: {error}"]
    return [f"settings file: {path} ({json.dumps(saved) if saved else 'none saved'})", f"settings in effect: {flags}"]
