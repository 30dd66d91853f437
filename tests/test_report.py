"""`nbfabric env` names what a bug report about a cluster or an integration needs."""

from __future__ import annotations

import shutil
from importlib import metadata

import pytest

from nbfabric.report import environment_report


@pytest.mark.parametrize("package", ["ipyparallel", "lightning", "accelerate", "deepspeed", "transformers"])
def test_the_optional_libraries_are_named_with_their_versions(package):
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        version = "not installed"
    assert f"{package}: {version}" in environment_report()


def test_slurm_and_mpi_are_said_to_be_there_or_not(monkeypatch):
    lines = environment_report()
    for what, command in (("slurm", "sbatch"), ("mpi", "mpiexec")):
        line = next(line for line in lines if line.startswith(f"{what}: "))
        assert line.startswith(f"{what}: yes") == (shutil.which(command) is not None)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "mpi: no (mpiexec not on PATH)" in environment_report()
