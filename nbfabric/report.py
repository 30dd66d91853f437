"""`nbfabric env`: what a bug report needs."""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata

from nbfabric.config import RunConfig
from nbfabric.devices import describe_hardware
from nbfabric.user_config import config_path, load_defaults

_REPORTED_VARIABLES = ("CUDA_", "NCCL_", "GLOO_", "PYTORCH_", "TORCH_", "NBFABRIC_", "OMP_")


def environment_report(config_file: str | None = None) -> list[str]:
    """What a bug report needs: versions, the hardware found (CUDA left uninitialised), the settings in effect."""
    import platform

    import torch


    lines = [f"python: {sys.version.split()[0]} ({sys.executable})", f"platform: {platform.platform()}"]
    lines += [f"{package}: {_version(package)}" for package in ("nbfabric", "torch", "ipykernel", "ipywidgets")]
    lines.append(f"torch built for CUDA: {torch.version.cuda or 'no'}")
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


def _settings_report(config_file: str | None) -> list[str]:
    path = config_file or config_path()
    try:
        saved = load_defaults(path)
        flags = RunConfig.resolve(**saved).as_flags()
    except ValueError as error:
        return [f"settings file: {path}", f"settings in effect: none, the file is broken: {error}"]
    return [f"settings file: {path} ({json.dumps(saved) if saved else 'none saved'})", f"settings in effect: {flags}"]
