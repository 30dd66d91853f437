"""fabric.save / fabric.load: round trips, strictness, weights_only, rank 0 writing, atomic replacement."""

from __future__ import annotations

import enum
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nbfabric
from nbfabric import Fabric

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)


def _fabric() -> Fabric:
    return Fabric(accelerator="cpu", devices=1)


@dataclass
class Settings:
    """A user class that only a full unpickler can rebuild."""

    depth: int
    name: str


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _trained(fabric: Fabric, seed: int):
    torch.manual_seed(seed)
    model = _net()
    optimizer = _sgd(model)
    model, optimizer = fabric.setup(model, optimizer)
    for _ in range(2):
        optimizer.zero_grad()
        fabric.backward(F.mse_loss(model(torch.randn(5, 3)), torch.randn(5, 2)))
        optimizer.step()
    return model, optimizer


def _assert_same_state(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=0, atol=0)


def _assert_same_optimizer_state(left: torch.optim.Optimizer, right: torch.optim.Optimizer) -> None:
    a, b = left.state_dict(), right.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for index in a["state"]:
        torch.testing.assert_close(a["state"][index]["momentum_buffer"], b["state"][index]["momentum_buffer"], rtol=0, atol=0)


# --------------------------------------------------------------------------- one process
def test_save_and_load_restore_model_and_optimizer_in_place_and_return_the_rest(tmp_path):
    fabric = _fabric()
    model, optimizer = _trained(fabric, seed=0)
    path = tmp_path / "ckpt.pt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3, "history": [0.5, 0.25]})

    fresh_model, fresh_optimizer = _trained(fabric, seed=1)
    assert not torch.equal(fresh_model.module[0].weight, model.module[0].weight)
    remainder = fabric.load(path, {"model": fresh_model, "optimizer": fresh_optimizer})

    assert remainder == {"step": 3, "history": [0.5, 0.25]}
    _assert_same_state(fresh_model.state_dict(), model.state_dict())
    _assert_same_optimizer_state(fresh_optimizer, optimizer)


def test_plain_values_named_in_the_state_are_updated_in_it(tmp_path):
    fabric = _fabric()
    model, optimizer = _trained(fabric, seed=0)
    path = tmp_path / "ckpt.pt"
    fabric.save(path, {"model": model, "step": 3})
    state = {"model": _trained(fabric, seed=2)[0], "step": 0}
    assert fabric.load(path, state) == {}
    assert state["step"] == 3


def test_saved_model_state_has_the_users_names_and_loads_into_a_plain_module(tmp_path):
    fabric = _fabric()
    model, optimizer = _trained(fabric, seed=0)
    path = tmp_path / "nested" / "dir" / "ckpt.pt"
    fabric.save(path, {"model": model, "optimizer": optimizer})

    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "optimizer"}
    assert list(raw["model"]) == list(model.module.state_dict())
    plain = _net()
    plain.load_state_dict(raw["model"])
    _assert_same_state(plain.state_dict(), model.state_dict())

    assert fabric.load(path).keys() == {"model", "optimizer"}


def test_load_raw_reads_a_plain_state_dict_file(tmp_path):
    fabric = _fabric()
    source, _ = _trained(fabric, seed=0)
    path = tmp_path / "weights.pt"
    torch.save(source.module.state_dict(), path)
    target, _ = _trained(fabric, seed=5)
    fabric.load_raw(path, target)
    _assert_same_state(target.state_dict(), source.state_dict())


def test_strict_load_names_the_missing_keys_and_non_strict_loads_what_is_there(tmp_path):
    fabric = _fabric()
    model, optimizer = _trained(fabric, seed=0)
    path = tmp_path / "ckpt.pt"
    fabric.save(path, {"model": model})

    fresh, fresh_optimizer = _trained(fabric, seed=1)
    untouched = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(KeyError, match="'optimizer'") as error:
        fabric.load(path, {"model": fresh, "optimizer": fresh_optimizer, "epoch": 0})
    assert "'epoch'" in str(error.value)
    _assert_same_state(fresh.state_dict(), untouched)

    state = {"model": fresh, "optimizer": fresh_optimizer, "epoch": 0}
    assert fabric.load(path, state, strict=False) == {}
    _assert_same_state(fresh.state_dict(), model.state_dict())
    assert state["epoch"] == 0


def test_load_refuses_arbitrary_pickled_objects_unless_weights_only_is_off(tmp_path):
    fabric = _fabric()
    path = tmp_path / "ckpt.pt"
    fabric.save(path, {"settings": Settings(depth=4, name="wide"), "step": 1})

    with pytest.raises(pickle.UnpicklingError):
        fabric.load(path)
    with pytest.raises(pickle.UnpicklingError):
        fabric.load(path, {"step": 0})
    assert fabric.load(path, weights_only=False) == {"settings": Settings(depth=4, name="wide"), "step": 1}


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    fabric = _fabric()
    path = tmp_path / "ckpt.pt"
    fabric.save(path, {"step": 1, "weights": torch.arange(4.0)})
    before = path.read_bytes()

    def failing_save(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        fabric.save(path, {"step": 2, "weights": torch.zeros(4)})

    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    monkeypatch.undo()
    assert fabric.load(path)["step"] == 1


@pytest.mark.parametrize("restore", ["fabric.load", "optimizer.load_state_dict"])
def test_a_resumed_wrapped_optimizer_follows_its_lr_scheduler_like_plain_torch(tmp_path, restore):
    fabric = _fabric()
    model, optimizer = _trained(fabric, seed=0)
    path = tmp_path / "ckpt.pt"
    fabric.save(path, {"model": model, "optimizer": optimizer})
    checkpoint = torch.load(path, weights_only=True)
    if restore == "fabric.load":
        fabric.load(path, {"model": model, "optimizer": optimizer})
    else:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])

    plain = _net()
    plain_optimizer = _sgd(plain)
    own_copy = torch.load(path, weights_only=True)  # optimizers loaded from one dict would share momentum tensors
    plain.load_state_dict(own_copy["model"])
    plain_optimizer.load_state_dict(own_copy["optimizer"])

    runs = (
        (model, optimizer, fabric.backward, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)),
        (plain, plain_optimizer, torch.Tensor.backward, torch.optim.lr_scheduler.StepLR(plain_optimizer, step_size=1, gamma=0.5)),
    )
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y = torch.randn(5, 3, generator=generator), torch.randn(5, 2, generator=generator)
        for net, opt, backward, scheduler in runs:
            opt.zero_grad()
            backward(F.mse_loss(net(x), y))
            opt.step()
            scheduler.step()

    for name, value in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, msg=name)
    assert optimizer.param_groups[0]["lr"] == plain_optimizer.param_groups[0]["lr"]
    assert len(optimizer.state) == len(plain_optimizer.state)


# --------------------------------------------------------------------------- two ranks
def _save_on_two_ranks(fabric: Fabric, path, out) -> None:
    rank = fabric.global_rank
    real_save = torch.save

    def recording_save(obj, file, *args, **kwargs):
        (out / f"torch.save called on rank {rank}").touch()
        time.sleep(0.3)  # a slow disk: the other rank must wait for the file
        return real_save(obj, file, *args, **kwargs)

    torch.save = recording_save  # this forked rank's torch only

    model, optimizer = _trained(fabric, seed=10 + rank)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3})
    complete_when_save_returned = path.exists()
    torch.save = real_save

    torch.manual_seed(99)
    fresh = _net()
    remainder = fabric.load(path, {"model": fresh})
    result = {
        "complete": complete_when_save_returned,
        "own": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "loaded": fresh.state_dict(),
        "remainder_keys": sorted(remainder),
    }
    with open(out / f"rank{rank}.pkl", "wb") as file:
        pickle.dump(result, file)


def test_on_two_ranks_only_rank_zero_writes_and_every_rank_can_load_after_save(tmp_path):
    path = tmp_path / "ckpt.pt"
    out = tmp_path / "out"
    out.mkdir()
    Fabric(accelerator="cpu", devices=2).launch(_save_on_two_ranks, path, out)

    writers = sorted(name for name in os.listdir(out) if name.startswith("torch.save"))
    assert writers == ["torch.save called on rank 0"]
    views = []
    for rank in range(2):
        with open(out / f"rank{rank}.pkl", "rb") as file:
            views.append(pickle.load(file))

    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 3
    assert list(saved["model"]) == list(_net().state_dict())
    _assert_same_state(saved["model"], views[0]["own"])
    for view in views:
        assert view["complete"]
        _assert_same_state(view["loaded"], saved["model"])
        assert view["remainder_keys"] == ["optimizer", "step"]


def _killed_while_saving(fabric: Fabric, path) -> None:
    torch.manual_seed(5)
    model = nn.Linear(3, 2)
    fabric.save(path, {"model": model, "step": 1})

    def dying_save(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 the first bytes of a torn checkpoint")
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save  # this forked rank's torch only
    with torch.no_grad():
        model.weight.add_(1.0)
    fabric.save(path, {"model": model, "step": 2})


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(nbfabric.RankError) as error:
        Fabric(accelerator="cpu", devices=2).launch(_killed_while_saving, path)
    assert error.value.rank == 0
    assert "SIGKILL" in str(error.value)

    checkpoint = torch.load(path, weights_only=True)
    torch.manual_seed(5)
    expected = nn.Linear(3, 2).state_dict()
    assert checkpoint["step"] == 1
    _assert_same_state(checkpoint["model"], expected)
    leftover = path.with_name(f".{path.name}.partial")
    assert leftover.exists()  # what the killed save was writing
    _fabric().save(path, {"step": 2})
    assert not leftover.exists() and torch.load(path, weights_only=True) == {"step": 2}


class _RunsCode:
    """A pickle that would create `marker` when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _sharded_checkpoint(directory):
    """A sharded checkpoint as fabric.save writes one (torch.distributed.checkpoint shards and extras)."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(3)
    model = nn.Linear(3, 2)
    dcp.save({"model": model.state_dict()}, checkpoint_id=directory, no_dist=True)
    torch.save({"step": 7}, directory / "extras.pt")
    return model


def test_a_sharded_checkpoint_whose_metadata_would_run_code_is_refused(tmp_path):
    from nbfabric.consolidate import consolidate

    directory, marker = tmp_path / "sharded", tmp_path / "ran"
    model = _sharded_checkpoint(directory)
    torch.testing.assert_close(consolidate(directory, tmp_path / "good.pt") and torch.load(tmp_path / "good.pt")["model"]["weight"], model.weight)
    (directory / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(pickle.UnpicklingError, match="posix.mkdir, which checkpoint metadata never holds"):
        _fabric().load(directory, {"model": nn.Linear(3, 2)})
    with pytest.raises(pickle.UnpicklingError, match="could run code"):
        consolidate(directory, tmp_path / "one.pt")
    command = subprocess.run([sys.executable, "-m", "nbfabric", "consolidate", str(directory), str(tmp_path / "one.pt")], capture_output=True, text=True)
    assert command.returncode == 1 and "could run code" in command.stderr
    assert not marker.exists() and not (tmp_path / "one.pt").exists()


def test_consolidate_loads_extras_that_hold_objects_only_when_trusted(tmp_path):
    from nbfabric.consolidate import consolidate

    directory, marker = tmp_path / "sharded", tmp_path / "ran"
    _sharded_checkpoint(directory)
    torch.save({"step": 7, "hook": _RunsCode(marker)}, directory / "extras.pt")
    with pytest.raises(pickle.UnpicklingError):
        consolidate(directory, tmp_path / "one.pt")
    assert not marker.exists()
    consolidate(directory, tmp_path / "one.pt", trusted=True)
    assert marker.exists()


def test_a_sharded_save_stopped_between_its_two_renames_is_found_again(tmp_path):
    directory = tmp_path / "sharded"
    model = _sharded_checkpoint(directory)
    os.replace(directory, tmp_path / ".sharded.previous")  # where the save had moved it when it stopped
    restored = nn.Linear(3, 2)
    assert _fabric().load(directory, {"model": restored}) == {"step": 7}
    torch.testing.assert_close(restored.weight, model.weight)


class _Shade(enum.Enum):
    DARK = 1


class _PickledAsGetattr:
    """What some Pythons (3.11.2) write for an enum member: getattr(its class, its name)."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_metadata_may_name_enum_members_through_getattr_and_nothing_else():
    import io

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    from nbfabric.checkpoint import MetadataUnpickler, enum_member

    member = pickle.dumps(_PickledAsGetattr(_MEM_FORMAT_ENCODING, "TORCH_CONTIGUOUS_FORMAT"))
    assert MetadataUnpickler(io.BytesIO(member)).load() is _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    assert enum_member(_Shade, "DARK") is _Shade.DARK
    for owner, name in ((_MEM_FORMAT_ENCODING, "__class__"), (_Shade, "__init__"), (int, "real")):
        with pytest.raises(pickle.UnpicklingError, match="no enum member"):
            enum_member(owner, name)
