"""Lightning Fabric's documented patterns, run under `lightning.fabric` and `nbfabric` with only the
import swapped, on 2 CPU ranks each: the same results, or the same refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nbfabric

lightning_fabric = pytest.importorskip("lightning.fabric", reason="the interop extra (lightning) is not installed")

FABRICS = {"lightning": lightning_fabric.Fabric, "nbfabric": nbfabric.Fabric}


def run_both(function, **settings):
    """`function(fabric)` on 2 forked CPU ranks under each framework; rank 0's result of each."""
    settings = {"accelerator": "cpu", "devices": 2, "strategy": "ddp_fork", **settings}
    return {name: fabric_class(**settings).launch(function) for name, fabric_class in FABRICS.items()}


class Regressor(nn.Module):
    """A model with a method other than forward that runs its layers."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def forward(self, x):
        return self.layer(x)

    def loss_on(self, x):
        return self.layer(x).pow(2).mean()

    def training_step(self, x):
        return self.loss_on(x)

    def size(self):
        return sum(p.numel() for p in self.parameters())


def _train_through(method_name: str, mark: bool):
    def train(fabric):
        torch.manual_seed(0)
        model = Regressor()
        model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
        if mark:
            model.mark_forward_method(method_name)
        try:
            for step in range(3):
                x = torch.randn(4, 3, generator=torch.Generator().manual_seed(10 * step + fabric.global_rank))
                loss = getattr(model, method_name)(x)
                optimizer.zero_grad()
                fabric.backward(loss)
                optimizer.step()
        except RuntimeError as error:
            return ("refused", "mark_forward_method('loss_on')" in str(error))
        weights = fabric.all_gather(torch.cat([p.detach().flatten() for p in model.parameters()]))
        return ("trained", bool(torch.equal(weights[0], weights[1])), model.size())

    return train


def test_a_marked_method_keeps_the_ranks_in_sync():
    results = run_both(_train_through("loss_on", mark=True))
    assert results["nbfabric"] == results["lightning"] == ("trained", True, 4)


def test_training_step_runs_through_the_wrapper_without_marking():
    results = run_both(_train_through("training_step", mark=False))
    assert results["nbfabric"] == results["lightning"] == ("trained", True, 4)


def test_an_unmarked_method_that_runs_layers_is_refused_not_left_out_of_sync():
    results = run_both(_train_through("loss_on", mark=False))
    assert results["nbfabric"] == results["lightning"] == ("refused", True)


def test_marking_forward_or_a_missing_method_is_an_error():
    def mark(fabric):
        model = fabric.setup(Regressor())
        errors = []
        for method in ("forward", "missing", 3):
            try:
                model.mark_forward_method(method)
            except (TypeError, ValueError, AttributeError) as error:
                errors.append(type(error).__name__)
        return errors

    results = run_both(mark)
    assert results["nbfabric"] == results["lightning"] == ["ValueError", "AttributeError", "TypeError"]


def _collectives(fabric):
    import torch.distributed as dist

    rank = fabric.global_rank
    seen = {}
    tensor = torch.tensor([1.0, 2.0]) * (rank + 1)
    reduced = fabric.all_reduce(tensor, reduce_op="sum")
    seen["in place"] = (reduced is tensor, tensor.tolist())
    ops = ("mean", "avg", "SUM", "max", dist.ReduceOp.SUM, dist.ReduceOp.MIN)
    seen["ops"] = [fabric.all_reduce(torch.tensor([rank + 1.0]), reduce_op=op).tolist() for op in ops]
    numbers = {"int": fabric.all_reduce(rank + 1, reduce_op="sum"), "float": fabric.all_gather(rank + 0.5), "bool": fabric.all_gather(True)}
    seen["numbers"] = {name: (str(value.dtype), value.tolist()) for name, value in numbers.items()}
    first_only = dist.new_group([0])
    if rank == 0:
        seen["subgroup"] = (fabric.all_gather(torch.tensor([5.0]), group=first_only).tolist(), fabric.all_reduce(torch.tensor([3.0]), group=first_only, reduce_op="sum").tolist())
    value = torch.tensor([rank + 1.0], requires_grad=True)
    fabric.all_gather(value, sync_grads=True).pow(2).sum().backward()
    seen["gradient through the gather"] = value.grad.tolist()
    seen["broadcast"] = fabric.broadcast({"from": rank}, src=1)
    return seen


def test_collectives_give_what_lightning_gives():
    results = run_both(_collectives)
    assert results["nbfabric"] == results["lightning"]
    assert results["nbfabric"]["gradient through the gather"] == [4.0]  # 2 ranks x d(x^2)/dx at x = 1


def test_an_unknown_reduce_op_is_refused_naming_the_choices():
    def reduce(fabric):
        try:
            fabric.all_reduce(torch.ones(1), reduce_op="average")
        except ValueError as error:
            return str(error)

    assert "choose one of mean, avg, sum, min, max, product" in nbfabric.Fabric(accelerator="cpu", devices=2).launch(reduce)


def test_the_mean_of_integers_is_a_float_where_lightning_truncates():
    def mean(fabric):
        return fabric.all_reduce(torch.tensor([fabric.global_rank + 1]), reduce_op="mean").tolist()

    assert run_both(mean) == {"lightning": [1], "nbfabric": [1.5]}  # a documented difference


@pytest.mark.parametrize("name", FABRICS)
def test_a_collective_before_launch_says_to_launch(name):
    fabric = FABRICS[name](accelerator="cpu", devices=2)
    with pytest.raises(RuntimeError, match="launch"):
        fabric.all_reduce(1)
