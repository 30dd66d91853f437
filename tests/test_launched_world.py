"""Ranks that a launcher started (torchrun, MPI) are one run: a plain `Fabric()` joins them, its
world is backed by a process group, and settings that contradict the launcher are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from nbfabric.launcher.machine import free_port

TRAIN = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from torch.utils.data import DataLoader
    from nbfabric import Fabric

    fabric = Fabric(accelerator="cpu", **json.loads(sys.argv[1]))
    seen = {"world_size": fabric.world_size, "group": dist.is_initialized() and dist.get_world_size(),
            "strategy": fabric.config.strategy}
    seen["sum"] = fabric.all_reduce(torch.tensor(float(fabric.global_rank + 1)), reduce_op="sum").item()
    loader = fabric.setup_dataloaders(DataLoader(torch.arange(8.0).view(8, 1), batch_size=2))
    seen["items"] = len(loader) * 2
    torch.manual_seed(fabric.global_rank)  # different initial weights: DDP must make them equal
    model = fabric.setup(torch.nn.Linear(1, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in loader:
        optimizer.zero_grad()
        fabric.backward(model(batch).pow(2).mean())
        optimizer.step()
    weights = fabric.all_gather(model.weight.detach().flatten())
    seen["same_weights"] = bool(torch.equal(weights[0], weights[1]))
    with open(os.path.join(sys.argv[2], f"rank{fabric.global_rank}.json"), "w") as file:
        json.dump(seen, file)
    """
)


def _results(tmp_path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]


def _torchrun(tmp_path, settings: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}", str(script), json.dumps(settings), str(tmp_path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)


def test_a_plain_fabric_under_torchrun_joins_one_real_run(tmp_path):
    finished = _torchrun(tmp_path, {})
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = _results(tmp_path)
    assert len(results) == 2
    for seen in results:
        assert seen == {"world_size": 2, "group": 2, "strategy": "ddp", "sum": 3.0, "items": 4, "same_weights": True}


def test_devices_that_contradict_the_launcher_are_refused_naming_both_numbers(tmp_path):
    finished = _torchrun(tmp_path, {"devices": 4})
    assert finished.returncode != 0
    assert _results(tmp_path) == []  # refused before any training
    assert "Fabric(devices=4) asks for 4 rank(s) per node, but the launcher started 2 per node" in finished.stderr


def test_num_nodes_contradicting_the_launcher_is_refused(monkeypatch):
    from nbfabric import Fabric

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"num_nodes=3.*2 node\(s\)"):
        Fabric(accelerator="cpu", num_nodes=3)


def _mpi_processes(tmp_path, settings: dict) -> list[subprocess.Popen]:
    """Two processes with the variables Open MPI's mpirun gives its ranks on one machine."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    processes = []
    for rank in range(2):
        env = {name: value for name, value in os.environ.items() if name not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(
            OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
            OMPI_COMM_WORLD_LOCAL_SIZE="2", PMIX_NAMESPACE=f"nbfabric-test-{os.getpid()}-{tmp_path.name}", OMP_NUM_THREADS="1",
        )
        processes.append(subprocess.Popen([sys.executable, str(script), json.dumps(settings), str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def test_ranks_with_mpi_variables_join_one_run(tmp_path):
    processes = _mpi_processes(tmp_path, {})
    try:
        outputs = [process.communicate(timeout=180) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [process.returncode for process in processes] == [0, 0], outputs[0][1][-3000:]
    results = _results(tmp_path)
    assert len(results) == 2 and all(seen["group"] == 2 and seen["sum"] == 3.0 and seen["same_weights"] for seen in results)


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec here (Debian's openmpi-bin provides it)")
def test_ranks_under_mpiexec_join_one_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    command = ["mpiexec", "-n", "2", "--oversubscribe", *(["--allow-run-as-root"] if os.geteuid() == 0 else []), sys.executable, str(script), "{}", str(tmp_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = _results(tmp_path)
    assert len(results) == 2 and all(seen["group"] == 2 and seen["sum"] == 3.0 and seen["same_weights"] for seen in results)
