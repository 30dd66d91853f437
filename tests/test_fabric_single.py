"""Fabric in one process: launch, setup wrappers, training steps, clipping, seeding, logging, callbacks."""

from __future__ import annotations

import os
import random
from datetime import timedelta
from unittest import mock

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nbfabric import Fabric, is_wrapped

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)


def _fabric(**kwargs) -> Fabric:
    return Fabric(accelerator="cpu", devices=1, **kwargs)


class Scaled(nn.Module):
    """A model with its own attributes and methods, as users write them."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.scale = scale

    def forward(self, x):
        return self.body(x) * self.scale

    def describe(self) -> str:
        return f"scaled by {self.scale}"


def _batches(count: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 4, generator=generator), torch.randn(6, 2, generator=generator)) for _ in range(count)]


def _grad_norm(module: nn.Module) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in module.parameters()]))


# --------------------------------------------------------------------------- launch
def test_launch_runs_the_function_in_this_process_with_its_arguments():
    fabric = _fabric()

    def train(fab, steps, *, name):
        return {"fabric": fab, "pid": os.getpid(), "steps": steps, "name": name, "rank": fab.global_rank}

    result = fabric.launch(train, 4, name="run")
    assert result == {"fabric": fabric, "pid": os.getpid(), "steps": 4, "name": "run", "rank": 0}
    assert (fabric.world_size, fabric.local_rank, fabric.node_rank, fabric.is_global_zero) == (1, 0, 0, True)
    again = fabric.launch(train, 1, name="again")  # a notebook cell run twice: it runs again, as Lightning's
    assert (again["steps"], again["name"], again["fabric"]) == (1, "again", fabric)


def test_launch_in_this_process_returns_the_very_objects_with_their_graphs_and_set_up_ones_as_set_up():
    """As Lightning's launch with one device: nothing copied to the CPU, detached or unwrapped for a trip back."""
    kept, model = torch.ones(2, requires_grad=True), Scaled()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def run(fabric):
        wrapped, wrapped_optimizer = fabric.setup(model, optimizer)
        return {"kept": kept, "output": wrapped(torch.ones(1, 4)).sum() * kept}, [wrapped, wrapped_optimizer]

    returned, set_up = _fabric().launch(run)
    assert returned["kept"] is kept
    returned["output"].sum().backward()  # the graph reaches the model's weights and `kept`
    assert kept.grad is not None and model.body[0].weight.grad is not None
    assert is_wrapped(set_up[0]) and set_up[0].module is model and set_up[1].optimizer is optimizer


def test_setup_before_launch_on_two_devices_says_to_launch_first():
    fabric = Fabric(accelerator="cpu", devices=2)
    model = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match=r"fabric\.launch"):
        fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=r"fabric\.launch"):
        fabric.setup_dataloaders(DataLoader(range(4)))


def test_plugins_are_refused():
    with pytest.raises(ValueError, match="precision="):
        _fabric(plugins=["anything"])


# --------------------------------------------------------------------------- setup wrappers
def test_setup_wrappers_keep_the_users_types_state_names_and_attributes():
    fabric = _fabric()
    original = Scaled(scale=2.0)
    original_keys = list(original.state_dict())
    optimizer = torch.optim.SGD(original.parameters(), lr=0.1, momentum=0.9)
    model, wrapped_optimizer = fabric.setup(original, optimizer)

    assert isinstance(wrapped_optimizer, torch.optim.SGD)
    assert isinstance(model, nn.Module)
    assert model.module is original
    assert list(model.state_dict()) == original_keys
    assert model.scale == 2.0
    assert model.describe() == "scaled by 2.0"
    assert model.body is original.body
    assert wrapped_optimizer.param_groups is optimizer.param_groups
    assert isinstance(fabric.setup(Scaled()), nn.Module)  # a module alone comes back alone, not in a tuple


def test_an_attribute_set_on_the_wrapped_model_reaches_the_original():
    fabric = _fabric()
    original = Scaled(scale=1.0)
    model = fabric.setup(original)
    x = torch.randn(3, 4)
    single = model(x)
    model.scale = 3.0
    assert original.scale == 3.0
    torch.testing.assert_close(model(x), 3 * single)


def test_setup_dataloaders_on_one_device_keeps_every_batch_and_len():
    fabric = _fabric()
    dataset = TensorDataset(torch.arange(10), torch.randn(10, 3))
    loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=4))
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert torch.equal(torch.cat([index for index, _ in batches]), torch.arange(10))
    assert all(x.device == fabric.device for _, x in batches)


# --------------------------------------------------------------------------- training
def test_fabric_training_steps_match_plain_torch():
    batches = _batches()
    torch.manual_seed(3)
    plain = Scaled()
    torch.manual_seed(3)
    ours = Scaled()
    fabric = _fabric()
    model, optimizer = fabric.setup(ours, torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9))
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    start = [p.detach().clone() for p in plain.parameters()]

    for x, y in batches:
        optimizer.zero_grad()
        fabric.backward(F.mse_loss(model(x), y))
        optimizer.step()
        plain_optimizer.zero_grad()
        F.mse_loss(plain(x), y).backward()
        plain_optimizer.step()

    for trained, reference, first in zip(model.parameters(), plain.parameters(), start):
        torch.testing.assert_close(trained, reference)
        assert not torch.equal(trained, first)


def test_backward_passes_keyword_arguments_to_torch():
    fabric = _fabric()
    model = fabric.setup(nn.Linear(3, 1))
    loss = model(torch.randn(4, 3)).pow(2).sum()
    fabric.backward(loss, retain_graph=True)
    first = model.weight.grad.clone()
    fabric.backward(loss)
    torch.testing.assert_close(model.weight.grad, 2 * first)


def test_backward_passes_positional_arguments_to_torch():
    fabric = _fabric()
    model = fabric.setup(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    weights = torch.randn(4, 2)
    fabric.backward(model(x), weights)
    reference = nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    reference(x).backward(weights)
    torch.testing.assert_close(model.weight.grad, reference.weight.grad)


def test_an_lr_scheduler_on_the_wrapped_optimizer_steps_and_decays_the_rate():
    fabric = _fabric()
    model, optimizer = fabric.setup(*_model_and_optimizer())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    rates = []
    for x, y in _batches(2):
        before = model.body[0].weight.detach().clone()
        optimizer.zero_grad()
        fabric.backward(F.mse_loss(model(x), y))
        grad = model.body[0].weight.grad.clone()
        optimizer.step()
        torch.testing.assert_close(model.body[0].weight, before - optimizer.param_groups[0]["lr"] * grad)
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == [0.05, 0.025]


def _model_and_optimizer(lr: float = 0.1):
    model = Scaled()
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def test_clip_gradients_by_norm_returns_the_norm_and_scales_to_max_norm():
    fabric = _fabric()
    model, optimizer = fabric.setup(*_model_and_optimizer())
    x, y = _batches(1)[0]
    fabric.backward(F.mse_loss(model(x), y) * 100)
    norm_before = _grad_norm(model)
    max_norm = float(norm_before) / 4

    returned = fabric.clip_gradients(model, optimizer, max_norm=max_norm)

    torch.testing.assert_close(returned, norm_before)
    torch.testing.assert_close(_grad_norm(model), torch.tensor(max_norm), rtol=1e-4, atol=1e-6)


def test_clip_gradients_by_value_bounds_every_entry():
    fabric = _fabric()
    model, optimizer = fabric.setup(*_model_and_optimizer())
    x, y = _batches(1)[0]
    fabric.backward(F.mse_loss(model(x), y) * 100)
    grads_before = [p.grad.clone() for p in model.parameters()]
    limit = float(max(g.abs().max() for g in grads_before)) / 3

    assert fabric.clip_gradients(model, optimizer, clip_val=limit) is None

    for before, param in zip(grads_before, model.parameters()):
        torch.testing.assert_close(param.grad, before.clamp(-limit, limit))
    assert max(float(p.grad.abs().max()) for p in model.parameters()) == pytest.approx(limit)


@pytest.mark.parametrize("kwargs", [{}, {"clip_val": 1.0, "max_norm": 1.0}])
def test_clip_gradients_needs_exactly_one_of_value_or_norm(kwargs):
    fabric = _fabric()
    model, optimizer = fabric.setup(*_model_and_optimizer())
    fabric.backward(model(torch.randn(2, 4)).sum())
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="clip_val.*max_norm"):
        fabric.clip_gradients(model, optimizer, **kwargs)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_no_backward_sync_needs_the_module_from_setup():
    fabric = _fabric()
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="fabric.setup"):
        fabric.no_backward_sync(model)
    with fabric.no_backward_sync(fabric.setup(model)):
        pass


# --------------------------------------------------------------------------- devices, seeding
def test_to_device_moves_nested_tensors_and_keeps_everything_else():
    fabric = _fabric()
    data = {"x": torch.ones(2), "pair": (torch.zeros(1), "label"), "items": [torch.arange(3), 7]}
    moved = fabric.to_device(data)
    assert moved.keys() == data.keys()
    assert isinstance(moved["pair"], tuple) and moved["pair"][1] == "label"
    assert moved["items"][1] == 7
    for tensor, original in ((moved["x"], data["x"]), (moved["pair"][0], data["pair"][0]), (moved["items"][0], data["items"][0])):
        assert tensor.device == fabric.device
        assert torch.equal(tensor, original)
    module = nn.Linear(2, 2)
    assert fabric.to_device(module) is module
    assert module.weight.device == fabric.device


def _draws():
    return random.random(), numpy.random.rand(), torch.rand(3), nn.Linear(3, 3).weight.detach().clone()


@pytest.fixture
def environ_restored():
    """The environment as it was before the test (seed_everything sets PL_GLOBAL_SEED, as Lightning's does)."""
    with mock.patch.dict(os.environ):
        yield


def test_seed_everything_makes_every_generator_repeat(environ_restored):
    assert Fabric.seed_everything(21) == 21
    first = _draws()
    assert _fabric().seed_everything(21) == 21
    second = _draws()
    Fabric.seed_everything(22)
    other = _draws()

    assert first[:2] == second[:2]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
    assert first[:2] != other[:2]
    assert not torch.equal(first[2], other[2])


# --------------------------------------------------------------------------- logging and callbacks
class RecordingLogger:
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((dict(metrics), step))


def test_log_and_log_dict_keep_values_in_order_and_reach_every_logger():
    loggers = [RecordingLogger(), RecordingLogger()]
    fabric = _fabric(loggers=loggers)
    assert fabric.logger is loggers[0]
    assert fabric.loggers == loggers

    fabric.log("loss", torch.tensor(0.75), step=0)
    fabric.log_dict({"loss": 0.5, "accuracy": torch.tensor([0.25])}, step=1)
    fabric.log("lr", 0.01)

    assert fabric.logged_metrics["loss"] == [0.75, 0.5]
    assert fabric.logged_metrics["accuracy"] == [0.25]
    assert fabric.logged_metrics["lr"] == [0.01]
    assert not isinstance(fabric.logged_metrics["loss"][0], torch.Tensor)
    assert len(fabric.logged_metrics) == 4
    with pytest.raises(KeyError, match="loss"):
        fabric.logged_metrics["missing"]
    expected = [({"loss": 0.75}, 0), ({"loss": 0.5, "accuracy": 0.25}, 1), ({"lr": 0.01}, None)]
    for logger in loggers:
        assert logger.calls == expected


def test_a_single_logger_need_not_be_in_a_list():
    logger = RecordingLogger()
    fabric = _fabric(loggers=logger)
    fabric.log("x", 1, step=5)
    assert logger.calls == [({"x": 1}, 5)]


def test_call_runs_the_hook_on_each_callback_that_has_it_in_order():
    events = []

    class EpochEnd:
        def __init__(self, name):
            self.name = name

        def on_train_epoch_end(self, *args, **kwargs):
            events.append((self.name, args, kwargs))

    class Unrelated:
        on_train_epoch_end = "not callable"

        def on_validation_end(self):
            events.append(("validation", (), {}))

    fabric = _fabric(callbacks=[EpochEnd("a"), Unrelated(), EpochEnd("b")])
    fabric.call("on_train_epoch_end", 3, loss=0.5)
    fabric.call("on_hook_nobody_has")
    assert events == [("a", (3,), {"loss": 0.5}), ("b", (3,), {"loss": 0.5})]

    single = _fabric(callbacks=EpochEnd("solo"))
    single.call("on_train_epoch_end")
    assert events[-1] == ("solo", (), {})


def test_a_timeout_is_checked_when_the_fabric_is_made_before_any_rank_starts(no_leaks):
    assert Fabric(accelerator="cpu", devices=2, timeout=timedelta(seconds=5)).timeout == 5.0
    for bad in ("5", -1, 0, float("nan"), True):
        with pytest.raises(ValueError, match="is not valid; give a number of seconds above 0"):
            Fabric(accelerator="cpu", devices=2, timeout=bad)
