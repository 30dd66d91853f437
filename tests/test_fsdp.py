"""FSDP on 2 CPU ranks (gloo): training equal to DDP, sharded parameters, full and sharded checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nbfabric import FSDP, Fabric, RankError
from nbfabric.consolidate import consolidate

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


def _train(fabric: Fabric, path: str, steps: int = 4) -> dict:
    model = _model()
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    generator = torch.Generator().manual_seed(1 + fabric.global_rank)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 2, generator=generator)
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
    local = sum(getattr(p, "to_local", lambda: p)().numel() for p in model.parameters())
    counts = fabric.all_gather(torch.tensor(local))
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": steps})
    return {
        "local_counts": counts.tolist(),
        "total": sum(p.numel() for p in _model().parameters()),
        "momentum": _momentum(fabric, optimizer),
    }


def _momentum(fabric: Fabric, optimizer) -> float:
    """The squared norm of every momentum buffer, over all shards."""
    local = sum(
        getattr(state["momentum_buffer"], "to_local", lambda: state["momentum_buffer"])().pow(2).sum()
        for state in optimizer.state.values()
    )
    return fabric.all_reduce(torch.as_tensor(local, dtype=torch.float32), reduce_op="sum").item()


def _fresh_optimizer_step(fabric: Fabric, path: str) -> dict:
    model = fabric.setup(_model())
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    state = {"model": model, "optimizer": optimizer, "step": 0}
    rest = fabric.load(path, state)
    return {"step": state["step"], "rest": rest, "momentum": _momentum(fabric, optimizer)}


def test_fsdp_training_matches_ddp_and_shards_the_parameters(tmp_path):
    fsdp = Fabric(accelerator="cpu", devices=2, strategy="fsdp").launch(_train, str(tmp_path / "fsdp.ckpt"))
    Fabric(accelerator="cpu", devices=2, strategy="ddp").launch(_train, str(tmp_path / "ddp.ckpt"))
    sharded = torch.load(tmp_path / "fsdp.ckpt", weights_only=True)
    replicated = torch.load(tmp_path / "ddp.ckpt", weights_only=True)
    assert sharded["model"].keys() == replicated["model"].keys()
    for name, tensor in replicated["model"].items():
        torch.testing.assert_close(sharded["model"][name], tensor, rtol=1e-5, atol=1e-6)
    assert not torch.equal(replicated["model"]["0.weight"], _model().state_dict()["0.weight"])
    assert sum(fsdp["local_counts"]) == fsdp["total"]
    assert all(abs(count - fsdp["total"] / 2) <= 0.1 * fsdp["total"] for count in fsdp["local_counts"])
    assert sharded["step"] == 4


def test_a_sharded_checkpoint_from_two_ranks_loads_on_one_and_consolidates(tmp_path):
    directory = tmp_path / "sharded"
    Fabric(accelerator="cpu", devices=2, strategy=FSDP(layers={nn.Linear}, state_dict_type="sharded")).launch(
        _train, str(directory)
    )
    assert directory.is_dir() and (directory / ".metadata").exists()
    full = tmp_path / "full.ckpt"
    Fabric(accelerator="cpu", devices=2, strategy="fsdp").launch(_train, str(full))
    expected = torch.load(full, weights_only=True)["model"]

    single = Fabric(accelerator="cpu", devices=1)
    model = _model()
    state = {"model": model, "step": 0}
    single.load(directory, state)
    assert state["step"] == 4
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name])

    one_file = consolidate(directory, tmp_path / "consolidated.ckpt")
    merged = torch.load(one_file, weights_only=True)
    torch.testing.assert_close(merged["model"]["2.weight"], expected["2.weight"])
    assert merged["step"] == 4

    command = [sys.executable, "-m", "nbfabric", "consolidate", str(directory), str(tmp_path / "by_command.ckpt")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    torch.testing.assert_close(torch.load(tmp_path / "by_command.ckpt", weights_only=True)["model"]["2.weight"], expected["2.weight"])
    refused = subprocess.run([*command[:4], str(tmp_path), str(tmp_path / "x.ckpt")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "is not a sharded checkpoint" in refused.stderr


def test_a_sharded_checkpoint_restores_model_and_optimizer_on_two_fsdp_ranks(tmp_path):
    directory = tmp_path / "sharded"
    options = FSDP(state_dict_type="sharded")
    trained = Fabric(accelerator="cpu", devices=2, strategy=options).launch(_train, str(directory))
    result = Fabric(accelerator="cpu", devices=2, strategy=options).launch(_fresh_optimizer_step, str(directory))
    assert (result["step"], result["rest"]) == (4, {})
    assert trained["momentum"] > 0
    assert abs(result["momentum"] - trained["momentum"]) <= 1e-5 * trained["momentum"]


@pytest.mark.known_leak(
    "fds",
    reason="torch keeps the gloo device (a pipe, an epoll fd, a socket) of the last process group that a DDP or "
    "FSDP module was built on, once the group is destroyed, until the next one: plain torch does the same",
)
def test_ddp_and_fsdp_run_in_process_on_one_device():
    def world(fabric: Fabric) -> tuple:
        model = fabric.setup(torch.nn.Linear(3, 3))
        return torch.distributed.get_world_size(), model(torch.ones(1, 3)).shape

    for strategy in ("ddp", "fsdp"):
        assert Fabric(accelerator="cpu", devices=1, strategy=strategy).launch(world) == (1, torch.Size([1, 3]))


def _resumed_from(fabric: Fabric, path: str, raw_model: str) -> dict:
    """A DDP checkpoint (its optimizer state keyed by index, as torch saves it) loaded into FSDP:
    by `fabric.load`, and the model's weights alone by `load_raw`; an optimizer alone is refused."""
    model = fabric.setup(_model())
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(path, state)
    again = fabric.setup(_model())
    fabric.load_raw(raw_model, again)
    try:
        fabric.load_raw(raw_model, fabric.setup_optimizers(torch.optim.SGD(again.parameters(), lr=0.1)))
        refused = ""
    except ValueError as error:
        refused = str(error)
    weights = {name: value.full_tensor() for name, value in model.state_dict().items()}
    raw = {name: value.full_tensor() for name, value in again.state_dict().items()}
    return {"step": state["step"], "momentum": _momentum(fabric, optimizer), "weights": weights, "raw": raw, "refused": refused}


def test_a_ddp_checkpoint_loads_into_fsdp_model_and_optimizer_and_load_raw_takes_a_model(tmp_path):
    path = str(tmp_path / "ddp.ckpt")
    Fabric(accelerator="cpu", devices=2, strategy="ddp").launch(_train, path)
    saved = torch.load(path, weights_only=True)
    torch.save(saved["model"], tmp_path / "weights.pt")
    resumed = Fabric(accelerator="cpu", devices=2, strategy="fsdp").launch(_resumed_from, path, str(tmp_path / "weights.pt"))
    momentum = sum(state["momentum_buffer"].pow(2).sum().item() for state in saved["optimizer"]["state"].values())
    assert resumed["step"] == 4 and momentum > 0 and abs(resumed["momentum"] - momentum) <= 1e-5 * momentum
    for name, tensor in saved["model"].items():
        assert torch.equal(resumed["weights"][name], tensor) and torch.equal(resumed["raw"][name], tensor)
    assert "cannot load an optimizer alone under FSDP" in resumed["refused"]


def _sharded_saves(fabric: Fabric, directory: str) -> dict:
    model = fabric.setup(_model())
    fabric.save(directory, {"model": model, "step": 1})
    if fabric.global_rank == 0:  # what a save killed after moving the new checkpoint in leaves
        (tmp := Path(directory).with_name(f".{Path(directory).name}.previous")).mkdir()
        (tmp / "stale").write_text("old")
    fabric.barrier()
    fabric.save(directory, {"model": model, "step": 2})
    try:
        fabric.load(directory)
        refused = ""
    except ValueError as error:
        refused = str(error)
    state = {"model": model, "step": 0}
    fabric.load(directory, state)
    return {"step": state["step"], "refused": refused, "left": sorted(p.name for p in Path(directory).parent.iterdir())}


def test_sharded_saves_go_on_after_one_that_was_stopped_and_a_load_without_the_model_is_refused(tmp_path):
    directory = tmp_path / "sharded"
    seen = Fabric(accelerator="cpu", devices=2, strategy=FSDP(state_dict_type="sharded")).launch(_sharded_saves, str(directory))
    assert seen["step"] == 2 and seen["left"] == ["sharded"]
    assert "is a sharded checkpoint: loading it needs the model it goes into" in seen["refused"]
    bigger = nn.Sequential(*_model(), nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"does not fit the state given: .*Missing key in checkpoint state_dict: model\.5\.weight.*strict=False"):
        Fabric(accelerator="cpu", devices=1).load(directory, {"model": bigger})
    Fabric(accelerator="cpu", devices=1).load(directory, {"model": bigger}, strict=False)


def _steps_only(fabric: Fabric) -> dict:
    model = _model()
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    generator = torch.Generator().manual_seed(1 + fabric.global_rank)
    for _ in range(2):
        fabric.backward(F.mse_loss(model(torch.randn(16, 8, generator=generator)), torch.randn(16, 2, generator=generator)))
        optimizer.step()
        optimizer.zero_grad()
    return {name: value.full_tensor() for name, value in model.state_dict().items()}


def test_cpu_offload_trains_on_a_machine_without_a_gpu_as_without_offload():
    offloaded = Fabric(accelerator="cpu", devices=2, strategy=FSDP(cpu_offload=True)).launch(_steps_only)
    plain = Fabric(accelerator="cpu", devices=2, strategy="fsdp").launch(_steps_only)
    for name, tensor in plain.items():
        torch.testing.assert_close(offloaded[name], tensor)


def _returns_the_model(fabric: Fabric):
    model = fabric.setup(_model())
    return model


def test_a_model_held_over_the_ranks_by_fsdp_returned_from_launch_is_refused_saying_how_to_get_it():
    with pytest.raises(RankError, match=r"the Sequential returned is held over the ranks by FSDP and cannot come back whole"):
        Fabric(accelerator="cpu", devices=2, strategy="fsdp").launch(_returns_the_model)
