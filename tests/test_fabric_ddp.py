"""Fabric on two real CPU ranks (gloo): gradient sync, sharded loaders, collectives, rank environment."""

from __future__ import annotations

import os
import pickle
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nbfabric import Fabric
from nbfabric.strategies.ddp import DDPStrategy

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)

WORLD = 2
SEED = 1234
LR = 0.1
DATASET_SIZE = 32
BATCH = 4  # per rank; the single-process reference uses 2 * BATCH
EPOCHS = 2


def _two_ranks() -> Fabric:
    return Fabric(accelerator="cpu", devices=WORLD)


def _report(directory, fabric: Fabric, values: dict) -> None:
    """What a rank observed, written to a file so the test can read every rank's view."""
    with open(directory / f"rank{fabric.global_rank}.pkl", "wb") as file:
        pickle.dump(values, file)


def _reports(directory) -> list[dict]:
    views = []
    for rank in range(WORLD):
        with open(directory / f"rank{rank}.pkl", "rb") as file:
            views.append(pickle.load(file))
    return views


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _flat_grads(module: nn.Module) -> torch.Tensor:
    return _flat(p.grad for p in module.parameters())


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def _regression_dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(DATASET_SIZE, 3, generator=generator)
    y = torch.randn(DATASET_SIZE, 1, generator=generator)
    return TensorDataset(torch.arange(DATASET_SIZE), x, y)


# --------------------------------------------------------------------------- gradient synchronisation
def _train_on_ranks(fabric: Fabric, dataset: TensorDataset) -> dict:
    torch.manual_seed(SEED)
    model = _mlp()
    initial = _flat(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=BATCH))
    seen, on_device = [], []
    for _ in range(EPOCHS):
        for index, x, y in loader:
            seen.append(index)
            on_device.append(x.device == fabric.device and y.device == fabric.device)
            loss = F.mse_loss(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
    return {
        "initial": initial,
        "params": fabric.all_gather(_flat(model.parameters())),
        "indices": fabric.all_gather(torch.stack(seen)),
        "batches_on_device": fabric.all_gather(torch.tensor(on_device)),
        "batches_per_epoch": len(loader),
    }


def _train_single_process_full_batch(dataset: TensorDataset) -> torch.Tensor:
    torch.manual_seed(SEED)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(EPOCHS):
        for _, x, y in DataLoader(dataset, batch_size=WORLD * BATCH):
            loss = F.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return _flat(model.parameters())


def test_ddp_training_keeps_ranks_identical_and_matches_full_batch_training():
    dataset = _regression_dataset()
    result = _two_ranks().launch(_train_on_ranks, dataset)

    params = result["params"]
    assert params.shape[0] == WORLD
    torch.testing.assert_close(params[1], params[0], rtol=0, atol=0)
    reference = _train_single_process_full_batch(dataset)
    torch.testing.assert_close(params[0], reference, rtol=1e-5, atol=1e-6)
    assert (params[0] - result["initial"]).abs().max() > 1e-3, "training did not move the parameters"

    steps_per_epoch = DATASET_SIZE // (WORLD * BATCH)
    assert result["batches_per_epoch"] == steps_per_epoch
    assert result["batches_on_device"].all()
    one_epoch = torch.arange(DATASET_SIZE).reshape(steps_per_epoch, WORLD * BATCH)
    for rank in range(WORLD):
        expected = one_epoch[:, rank::WORLD].repeat(EPOCHS, 1)
        assert torch.equal(result["indices"][rank], expected)


# --------------------------------------------------------------------------- sharded, shuffled loaders
def _shuffled_epochs(fabric: Fabric, size: int, batch_size: int, epochs: int) -> dict:
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(torch.arange(size)), batch_size=batch_size, shuffle=True))
    orders, on_device = [], []
    for _ in range(epochs):
        order = []
        for (index,) in loader:
            on_device.append(index.device == fabric.device)
            order.append(index)
        orders.append(torch.cat(order))
    return {
        "orders": fabric.all_gather(torch.stack(orders)),  # [rank, epoch, position]
        "batches_per_epoch": len(loader),
        "all_on_device": all(on_device),
    }


def test_shuffled_loader_shards_are_disjoint_cover_the_data_and_change_every_epoch():
    size, batch_size, epochs = 20, 3, 3
    result = _two_ranks().launch(_shuffled_epochs, size, batch_size, epochs)

    orders = result["orders"]
    per_rank = size // WORLD
    assert orders.shape == (WORLD, epochs, per_rank)
    assert result["batches_per_epoch"] == -(-per_rank // batch_size)
    assert result["all_on_device"]
    for epoch in range(epochs):
        together = torch.cat([orders[0, epoch], orders[1, epoch]])
        assert sorted(together.tolist()) == list(range(size)), f"epoch {epoch} is not an exact cover"
    for rank in range(WORLD):
        assert orders[rank, 0].tolist() != sorted(orders[rank, 0].tolist()), "the shard was not shuffled"
        for epoch in range(1, epochs):
            assert not torch.equal(orders[rank, epoch], orders[rank, epoch - 1]), "same order in two epochs"


def _set_up_loaders(fabric: Fabric) -> dict:
    given = DataLoader(TensorDataset(torch.arange(10.0)), batch_size=2)
    loader = fabric.setup_dataloaders(given)
    return {"loader": loader, "nested": [{"loader": loader}], "rank_saw": sum(len(batch) for batch, in loader)}


def test_a_set_up_loader_comes_back_as_the_one_given_over_the_whole_dataset():
    """A rank iterates its shard; what comes back, alone or inside another value, is the user's
    loader, which covers the data (a rank's shard in the notebook would cover half of it)."""
    result = _two_ranks().launch(_set_up_loaders)
    assert result["rank_saw"] == 5
    for loader in (result["loader"], result["nested"][0]["loader"]):
        assert type(loader) is DataLoader and type(loader.sampler).__name__ == "SequentialSampler"
        assert [x for batch, in loader for x in batch.tolist()] == [float(i) for i in range(10)]
    assert result["nested"][0]["loader"] is result["loader"]


# --------------------------------------------------------------------------- collectives
class Note:
    """An arbitrary user object sent through broadcast."""

    def __init__(self, sender: int, items: list):
        self.sender = sender
        self.items = items

    def __eq__(self, other):
        return isinstance(other, Note) and (self.sender, self.items) == (other.sender, other.items)


def _gather_input(rank: int) -> torch.Tensor:
    return torch.arange(3) + 10 * rank


def _reduce_input(rank: int) -> torch.Tensor:
    return torch.tensor([rank + 1.0, -3.0 * (rank + 1), 0.5 + rank])


def _collectives(fabric: Fabric, out) -> None:
    rank = fabric.global_rank
    seen = {
        "identity": {
            "global_rank": fabric.global_rank,
            "local_rank": fabric.local_rank,
            "node_rank": fabric.node_rank,
            "world_size": fabric.world_size,
            "is_global_zero": fabric.is_global_zero,
            "device": fabric.device,
        }
    }

    if rank == 1:
        time.sleep(0.3)
    arrived = time.monotonic()
    fabric.barrier()
    seen["barrier"] = (arrived, time.monotonic())

    seen["from_0"] = fabric.broadcast({"sender": rank, "nested": [rank, ("x" * (rank + 1), None)]}, src=0)
    seen["from_1"] = fabric.broadcast(Note(rank, list(range(rank + 2))), src=1)

    seen["gather_tensor"] = fabric.all_gather(_gather_input(rank))
    seen["gather_dict"] = fabric.all_gather({"a": _gather_input(rank).float(), "b": torch.full((2, 2), rank)})
    seen["gather_number"] = fabric.all_gather(rank + 0.5)

    seen["reduce"] = {op: fabric.all_reduce(_reduce_input(rank), reduce_op=op) for op in ("mean", "sum", "min", "max")}
    seen["reduce_number"] = fabric.all_reduce(rank + 1, reduce_op="sum")
    try:
        fabric.all_reduce(torch.ones(1), reduce_op="average")
    except ValueError as error:
        seen["bad_op"] = str(error)

    shared = out / "written-by-rank-0.txt"
    with fabric.rank_zero_first():
        if rank == 0:
            time.sleep(0.3)
            shared.write_text("rank 0 was here")
            seen["first_block"] = time.monotonic()
        else:
            seen["first_block"] = time.monotonic()
            seen["read_in_block"] = shared.read_text() if shared.exists() else None

    fabric.print(f"fabric.print from rank {rank}")
    print(f"plain print from rank {rank}")
    _report(out, fabric, seen)


def test_collectives_rank_identity_and_rank_zero_output(tmp_path, capsys):
    _two_ranks().launch(_collectives, tmp_path)
    views = _reports(tmp_path)

    for rank, view in enumerate(views):
        assert view["identity"] == {
            "global_rank": rank,
            "local_rank": rank,
            "node_rank": 0,
            "world_size": WORLD,
            "is_global_zero": rank == 0,
            "device": torch.device("cpu"),
        }

    rank1_arrived = views[1]["barrier"][0]
    assert views[0]["barrier"][1] >= rank1_arrived, "rank 0 left the barrier before rank 1 reached it"

    for view in views:
        assert view["from_0"] == {"sender": 0, "nested": [0, ("x", None)]}
        assert view["from_1"] == Note(1, [0, 1, 2])

    expected_gather = torch.stack([_gather_input(r) for r in range(WORLD)])
    expected_reduce_inputs = torch.stack([_reduce_input(r) for r in range(WORLD)])
    expected_reduce = {
        "mean": expected_reduce_inputs.mean(0),
        "sum": expected_reduce_inputs.sum(0),
        "min": expected_reduce_inputs.min(0).values,
        "max": expected_reduce_inputs.max(0).values,
    }
    for view in views:
        assert torch.equal(view["gather_tensor"], expected_gather)
        assert set(view["gather_dict"]) == {"a", "b"}
        assert torch.equal(view["gather_dict"]["a"], expected_gather.float())
        assert torch.equal(view["gather_dict"]["b"], torch.stack([torch.full((2, 2), r) for r in range(WORLD)]))
        torch.testing.assert_close(view["gather_number"], torch.tensor([r + 0.5 for r in range(WORLD)]))
        for op, expected in expected_reduce.items():
            torch.testing.assert_close(view["reduce"][op], expected, msg=f"all_reduce {op}")
        assert view["reduce_number"].item() == sum(r + 1 for r in range(WORLD))
        assert "'average'" in view["bad_op"]
        for choice in ("mean", "sum", "min", "max"):
            assert choice in view["bad_op"]

    assert views[1]["first_block"] >= views[0]["first_block"], "rank 1 entered rank_zero_first's block too early"
    assert views[1]["read_in_block"] == "rank 0 was here"

    out = capsys.readouterr().out.splitlines()
    assert "[rank 0] fabric.print from rank 0" in out
    assert not any("fabric.print from rank 1" in line for line in out)
    assert "[rank 1] plain print from rank 1" in out


def _nested_numbers(fabric: Fabric) -> dict:
    rank = fabric.global_rank
    return {
        "gathered": fabric.all_gather({"correct": rank + 1, "loss": torch.tensor(float(rank))}),
        "reduced": fabric.all_reduce({"correct": rank + 1}, reduce_op="sum"),
    }


def _slow_first(fabric: Fabric) -> list:
    order = []
    with fabric.rank_zero_first():
        if fabric.global_rank == 0:
            time.sleep(3)  # past the process group's 1 s timeout, as a download can be
        order.append(time.monotonic())
    return fabric.all_gather(torch.tensor(order, dtype=torch.float64)).tolist()


def test_rank_zero_first_waits_past_the_process_group_timeout_as_lightnings_does():
    times = Fabric(accelerator="cpu", devices=WORLD, strategy=DDPStrategy(timeout=1)).launch(_slow_first)
    assert times[0][0] < times[1][0]  # rank 1 ran its block after rank 0's


def test_numbers_inside_collections_are_gathered_and_reduced():
    result = _two_ranks().launch(_nested_numbers)
    assert torch.equal(torch.as_tensor(result["gathered"]["correct"]), torch.tensor([1, 2]))
    assert torch.equal(result["gathered"]["loss"], torch.tensor([0.0, 1.0]))
    assert torch.as_tensor(result["reduced"]["correct"]).item() == 3


# --------------------------------------------------------------------------- no_backward_sync
def _backward_sync(fabric: Fabric, out) -> None:
    rank = fabric.global_rank
    torch.manual_seed(100 + rank)  # a different initialisation on each rank
    model = nn.Linear(4, 2)
    before_setup = _flat(model.parameters())
    model = fabric.setup(model)
    after_setup = _flat(model.parameters())
    x = torch.randn(5, 4)  # different data on each rank

    with fabric.no_backward_sync(model):
        fabric.backward(model(x).pow(2).sum())
    local = _flat_grads(model)

    model.zero_grad()
    fabric.backward(model(x).pow(2).sum())
    synced = _flat_grads(model)

    model.zero_grad()
    with fabric.no_backward_sync(model, enabled=False):
        fabric.backward(model(x).pow(2).sum())
    not_skipped = _flat_grads(model)

    _report(out, fabric, {"before": before_setup, "after": after_setup, "local": local, "synced": synced, "not_skipped": not_skipped})


def test_no_backward_sync_keeps_gradients_local_and_a_synced_backward_averages_them(tmp_path):
    _two_ranks().launch(_backward_sync, tmp_path)
    r0, r1 = _reports(tmp_path)

    assert not torch.equal(r0["before"], r1["before"])
    torch.testing.assert_close(r0["after"], r0["before"], rtol=0, atol=0)
    torch.testing.assert_close(r1["after"], r0["before"], rtol=0, atol=0)

    assert not torch.allclose(r0["local"], r1["local"]), "gradients were synchronised inside no_backward_sync"
    average = (r0["local"] + r1["local"]) / 2
    for view in (r0, r1):
        torch.testing.assert_close(view["synced"], average)
        torch.testing.assert_close(view["not_skipped"], average)


# --------------------------------------------------------------------------- rank environment
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "OMP_NUM_THREADS")


def _environment(fabric: Fabric, out) -> None:
    _report(
        out,
        fabric,
        {"env": {name: os.environ.get(name) for name in _RANK_VARIABLES}, "threads": torch.get_num_threads(), "pid": os.getpid()},
    )


def test_each_rank_sees_a_torchrun_environment_and_the_parent_environment_is_unchanged(no_leaks, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for name in _RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)

    _two_ranks().launch(_environment, tmp_path)

    assert dict(os.environ) == before
    views = _reports(tmp_path)
    threads = max(1, len(os.sched_getaffinity(0)) // WORLD)
    for rank, view in enumerate(views):
        env = view["env"]
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == str(WORLD)
        assert env["NODE_RANK"] == "0"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["OMP_NUM_THREADS"] == str(threads)
        assert view["threads"] == threads
        assert view["pid"] != os.getpid()
    assert views[0]["env"]["MASTER_PORT"] == views[1]["env"]["MASTER_PORT"]
    assert 0 < int(views[0]["env"]["MASTER_PORT"]) < 65536
    assert views[0]["pid"] != views[1]["pid"]


def test_a_thread_count_the_user_set_after_importing_torch_reaches_every_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # torch, imported already, no longer reads it
    _two_ranks().launch(_environment, tmp_path)
    assert [view["env"]["OMP_NUM_THREADS"] for view in _reports(tmp_path)] == ["3", "3"]
    assert [view["threads"] for view in _reports(tmp_path)] == [3, 3]
    assert os.environ["OMP_NUM_THREADS"] == "3"


def _listening_addresses(fabric) -> list:
    """Where this rank's process listens for TCP connections (rank 0 serves the run's store)."""
    import psutil

    fabric.barrier()
    return sorted({c.laddr.ip for c in psutil.Process().net_connections(kind="tcp") if c.status == "LISTEN" and c.laddr.port == int(os.environ["MASTER_PORT"])})


def test_on_several_nodes_the_store_listens_on_the_main_address_only(no_leaks):
    import threading

    from nbfabric.launcher.machine import free_port
    from nbfabric.launcher.launchers import NodePlace
    from nbfabric.launcher.output import Sink

    port, results = free_port(), {}

    def node(node_rank):
        fabric = Fabric(accelerator="cpu", devices=1, num_nodes=2)
        place = NodePlace(node_rank, "127.0.0.1", port, run_key="c3f1a9e27b5d4086a4e2f0b1d3c5e7a9")
        fabric.timeout = 60
        results[node_rank] = fabric._launch(_listening_addresses, sink=Sink(), place=place)

    other = threading.Thread(target=node, args=(1,))
    other.start()
    node(0)
    other.join()
    assert results == {0: ["127.0.0.1"], 1: None}  # a value comes back from global rank 0 only
