"""Less travelled corners of Lightning Fabric's API, run the same way under `lightning.fabric` and
nbfabric on CPU ranks (gloo): copies of set-up objects, one-rank DDP, batch samplers, models compiled
after `setup`, checkpoint states and filters, hooks and the refusal of a plain `loss.backward()`."""

from __future__ import annotations

import copy
import os
import random
import warnings
from unittest import mock

import numpy
import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, WeightedRandomSampler

import nbfabric
from lightning_pair import FABRICS, HELPERS, covers, error_name, run_both, same


def _one_rank_of_ddp(function, *args) -> dict:
    """`run_both` with strategy="ddp" on one device, which runs in this process: the process group and
    the variables (MASTER_PORT, RANK, ...) each framework sets here are undone after it, so that the
    other, and later tests and the scripts they start, begin clean."""
    import torch.distributed as dist

    results = {}
    for name, fabric_class in FABRICS.items():
        try:
            with mock.patch.dict(os.environ):
                results[name] = fabric_class(accelerator="cpu", devices=1, strategy="ddp").launch(function, HELPERS[name], *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return results


def _numbers(tensor: torch.Tensor) -> list:
    return [round(value, 5) for value in tensor.detach().float().flatten().tolist()]


# ----------------------------------------------------------------- copies of what setup returns
def _copies(fabric, helpers):
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    model, optimizer = fabric.setup(layer, torch.optim.SGD(layer.parameters(), lr=0.1))
    ema, shallow = copy.deepcopy(model), copy.copy(model)
    x = torch.randn(2, 4)
    with torch.no_grad():
        ema.module.weight.add_(1.0)
    loss = ema(x).float().sum()
    fabric.backward(loss)  # a loss from the copy goes through fabric.backward like the model's
    return {
        "set up": (helpers["is_wrapped"](ema), helpers["is_wrapped"](shallow), type(ema.module).__name__),
        "shallow shares the model": shallow.module is model.module,
        "copy is its own": ema.module.weight.data_ptr() != model.module.weight.data_ptr(),
        "output": (str(ema(x).dtype), _numbers(ema(x))),
        "copy's gradient": _numbers(ema.module.weight.grad),
        "model untouched": model.module.weight.grad is None,
    }


# The 16-bit cases run on one device, in this process: a forked Lightning rank can hang in the
# OpenMP of a bfloat16 matmul once this process has used OpenMP threads (libgomp is not fork-safe).
@covers("Fabric.setup", "_FabricModule.module", "_FabricOptimizer.optimizer")
@pytest.mark.parametrize(("precision", "devices"), [("32-true", 2), ("32-true", 1), ("bf16-mixed", 1), ("bf16-true", 1)])
def test_a_deep_copy_of_a_set_up_model_is_set_up_too(precision, devices):
    seen = same(run_both(_copies, devices=devices, precision=precision))
    assert seen["set up"] == (True, True, "Linear") and seen["copy is its own"] and seen["model untouched"]


def test_a_deep_copy_of_a_set_up_optimizer_steps_its_own_parameters():
    """(Lightning's copy recurses without end, so this one is nbfabric's alone.)"""
    from nbfabric import Fabric, is_wrapped

    fabric = Fabric(accelerator="cpu", devices=1)
    layer = nn.Linear(2, 2)
    model, optimizer = fabric.setup(layer, torch.optim.SGD(layer.parameters(), lr=0.5))
    twin_model, twin_optimizer = copy.deepcopy((model, optimizer))
    fabric.backward(twin_model(torch.ones(1, 2)).sum())
    before = model.module.weight.detach().clone()
    twin_optimizer.step()
    assert is_wrapped(twin_optimizer) and type(twin_optimizer.optimizer) is torch.optim.SGD
    assert torch.equal(model.module.weight, before) and not torch.equal(twin_model.module.weight, before)


# ----------------------------------------------------------------- loaders
class _Items(torch.utils.data.Dataset):
    def __len__(self):
        return 11

    def __getitem__(self, index):
        return index


def _epochs(fabric, loader, epochs: int = 3) -> list:
    loader = fabric.setup_dataloaders(loader)
    return [len(loader), loader.batch_size, [[batch.tolist() for batch in loader] for _ in range(epochs)]]


def _one_rank_loaders(fabric, helpers):
    torch.manual_seed(0)
    return {
        "shuffled": _epochs(fabric, DataLoader(_Items(), batch_size=2, shuffle=True)),
        "weighted": _epochs(fabric, DataLoader(_Items(), batch_size=2, sampler=WeightedRandomSampler([1.0] * 11, 11, generator=torch.Generator().manual_seed(0)))),
        "in order": _epochs(fabric, DataLoader(_Items(), batch_size=3)),
    }


@covers("Fabric.setup_dataloaders")
@pytest.mark.parametrize("seed", [None, 123])
def test_one_rank_of_ddp_reads_its_loaders_through_a_distributed_sampler_as_lightning(seed):
    def loaders(fabric, helpers):
        if seed is not None:
            fabric.seed_everything(seed, verbose=False)
        return _one_rank_loaders(fabric, helpers)

    same(_one_rank_of_ddp(loaders))


def _batch_samplers(fabric, helpers):
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        return {
            "in order": _epochs(fabric, DataLoader(_Items(), batch_sampler=BatchSampler(SequentialSampler(range(11)), 3, False)), 2),
            "shuffled": _epochs(fabric, DataLoader(_Items(), batch_sampler=BatchSampler(RandomSampler(range(11)), 3, True)), 2),
        }


@covers("Fabric.setup_dataloaders")
@pytest.mark.parametrize("devices", [1, 2])
def test_a_plain_batch_sampler_is_replaced_as_lightning_replaces_it_and_said_so(devices):
    seen = same(_one_rank_of_ddp(_batch_samplers) if devices == 1 else run_both(_batch_samplers))
    assert seen["in order"][1] == 1  # one sample per batch, as Lightning makes it
    with pytest.warns(UserWarning, match="replaced, as Lightning Fabric replaces it"):
        _one_rank_of_ddp(lambda fabric, helpers: _epochs(fabric, DataLoader(_Items(), batch_sampler=BatchSampler(SequentialSampler(range(11)), 3, False)), 1))


# ----------------------------------------------------------------- a model compiled after setup
def _compiled_after_setup(fabric, helpers, path):
    torch.manual_seed(0)
    model = fabric.setup(nn.Linear(2, 2))
    compiled = torch.compile(model, backend="eager")
    with fabric.no_backward_sync(compiled):
        loss = compiled(torch.ones(3, 2)).sum()
    fabric.backward(loss, model=compiled)
    fabric.save(path, {"model": compiled})
    saved = sorted(torch.load(path, weights_only=True)["model"])
    with torch.no_grad():
        model.module.weight.zero_()
    rest = fabric.load(path, {"model": compiled})
    return {"saved": saved, "rest": rest, "restored": model.module.weight.abs().sum().item() > 0}


@covers("Fabric.save", "Fabric.load", "Fabric.no_backward_sync", "Fabric.backward")
def test_a_model_compiled_after_setup_saves_loads_and_syncs_as_the_model(tmp_path):
    seen = same(run_both(_compiled_after_setup, str(tmp_path / "model.ckpt")))
    assert seen == {"saved": ["bias", "weight"], "rest": {}, "restored": True}


# ----------------------------------------------------------------- checkpoint states
class _OnlyStateDict:
    """Has state_dict() but no load_state_dict(): saved as itself, as Lightning saves it."""

    def __init__(self):
        self.v = 3

    def state_dict(self):
        return {"v": self.v}


def _checkpoint_states(fabric, helpers, root):
    folder = f"{root}/{type(fabric).__module__.split('.')[0]}"  # each framework's files apart
    model = fabric.setup(nn.Linear(2, 2))
    seen = {}
    fabric.save(f"{folder}/filtered.ckpt", {"model": model, "n": 1}, filter={"model": lambda name, value: False})
    seen["filtered out"] = sorted(torch.load(f"{folder}/filtered.ckpt", weights_only=True))
    seen["strict load of it"] = error_name(lambda: fabric.load(f"{folder}/filtered.ckpt", {"model": model}))
    fabric.save(f"{folder}/objects.ckpt", {"only": _OnlyStateDict(), "n": 2})
    seen["saved as itself"] = type(torch.load(f"{folder}/objects.ckpt", weights_only=False)["only"]).__name__
    seen["not a dict"] = error_name(lambda: fabric.save(f"{folder}/bad.ckpt", model))  # on every rank: no rank waits alone
    fabric.barrier()
    fabric.save(f"{folder}/model.ckpt", {"model": model, "step": 5})
    with torch.no_grad():
        model.module.weight.zero_()
    fabric.load_raw(f"{folder}/model.ckpt", state := {"model": model, "step": 0})
    seen["load_raw into a dict"] = (state["step"], model.module.weight.abs().sum().item() > 0)
    return seen


@covers("Fabric.save", "Fabric.load", "Fabric.load_raw")
def test_checkpoint_states_filters_and_failures_are_lightnings(tmp_path):
    seen = same(run_both(_checkpoint_states, str(tmp_path)))
    assert seen["filtered out"] == ["n"] and seen["saved as itself"] == "_OnlyStateDict"


class _Renaming(nn.Module):
    """A model whose own load_state_dict takes checkpoints of an older version (`old.*` names)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        renamed = {key.replace("old.", "layer."): value for key, value in state_dict.items()}
        return super().load_state_dict(renamed, strict=strict, assign=assign)


class _PreHooked(nn.Module):
    """A model that renames old names with a load pre-hook."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self._register_load_state_dict_pre_hook(self._rename)

    @staticmethod
    def _rename(state_dict, prefix, *args):
        for key in [key for key in state_dict if key.startswith(prefix + "old.")]:
            state_dict[key.replace("old.", "layer.", 1)] = state_dict.pop(key)


def _loads_through_the_model(fabric, helpers, folder):
    old = {"old.weight": torch.full((2, 2), 2.0), "old.bias": torch.full((2,), 3.0)}
    if fabric.global_rank == 0:
        torch.save({"model": old}, f"{folder}/old.ckpt")
        torch.save({"model": {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}}, f"{folder}/lazy.ckpt")
    fabric.barrier()
    seen = {}
    for kind in (_Renaming, _PreHooked):
        for strict in (True, False):
            model = kind()
            fabric.load(f"{folder}/old.ckpt", {"model": model}, strict=strict)
            seen[f"{kind.__name__} strict={strict}"] = model.layer.weight.sum().item(), model.layer.bias.sum().item()
    lazy = nn.LazyLinear(3)
    fabric.load(f"{folder}/lazy.ckpt", {"model": lazy})
    seen["lazy"] = tuple(lazy.weight.shape), lazy.weight.sum().item()
    compiled = torch.compile(nn.Linear(2, 1))  # not set up: its names start with _orig_mod.
    with torch.no_grad():
        compiled.weight.fill_(4.0)
    fabric.save(f"{folder}/compiled.ckpt", {"model": compiled})
    seen["compiled saved as"] = sorted(torch.load(f"{folder}/compiled.ckpt")["model"])
    again = torch.compile(nn.Linear(2, 1))
    fabric.load(f"{folder}/compiled.ckpt", {"model": again})
    seen["compiled"] = again.weight.sum().item()
    return seen


@pytest.mark.parametrize("devices", [1, 2])
@covers("Fabric.load", "Fabric.save")
def test_a_checkpoint_loads_through_the_models_own_load_state_dict_as_lightnings(tmp_path, devices):
    seen = same(run_both(_loads_through_the_model, str(tmp_path), devices=devices))
    assert seen["_Renaming strict=False"] == (8.0, 6.0) and seen["_PreHooked strict=True"] == (8.0, 6.0)
    assert seen["compiled"] == 8.0 and seen["compiled saved as"] == ["_orig_mod.bias", "_orig_mod.weight"]


def _draws():
    return torch.tensor([torch.rand(1).item(), random.random(), float(numpy.random.rand())])


def _draws_and_settings(fabric, helpers):
    draws = _draws()
    weight = nn.Linear(2, 1).weight.detach().flatten()  # built in the run, unseeded there
    return {
        "draws per rank": fabric.all_gather(draws).tolist(),
        "weights per rank": fabric.all_gather(weight).tolist(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
    }


def _seed_every_generator(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed)


def test_spawned_ranks_start_from_the_launching_process_s_random_states_and_settings_as_lightnings():
    """As Lightning's ddp_spawn restores them in each rank (its own spawned ranks, run here, fail
    now and then as they end: torch's spawn reports a rank that called std::terminate)."""
    _seed_every_generator(42)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        seen = nbfabric.Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(_draws_and_settings, HELPERS["nbfabric"])
    finally:
        torch.use_deterministic_algorithms(False)
    _seed_every_generator(42)
    assert seen["draws per rank"][0] == seen["draws per rank"][1] == _draws().tolist()
    assert seen["weights per rank"][0] == seen["weights per rank"][1] == nn.Linear(2, 1).weight.detach().flatten().tolist()
    assert seen["deterministic"] == (True, True)


def _zero_redundancy_saved_and_loaded(fabric, helpers, folder, framework):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    helpers["seed_everything"](1)
    path = f"{folder}/{framework}-zero.ckpt"

    def trained(steps):
        model = nn.Linear(4, 4)
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=0.1)
        model, optimizer = fabric.setup(model, optimizer)
        for _ in range(steps):
            fabric.backward(model(torch.ones(2, 4) * (fabric.global_rank + 1)).sum())
            optimizer.step()
            optimizer.zero_grad()
        return model, optimizer

    model, optimizer = trained(3)
    state_dict = optimizer.state_dict()  # gathered on rank 0 too
    fabric.save(path, {"model": model, "optimizer": optimizer})
    saved = torch.load(path, weights_only=False)["optimizer"]  # rank 0 wrote it; every rank reads it
    model, resumed = trained(0)
    fabric.load(path, {"model": model, "optimizer": resumed})
    fabric.backward(model(torch.ones(2, 4)).sum())
    resumed.step()  # on from the loaded moments, each rank updating its shard
    return {
        "saved steps": sorted((index, state["step"].item()) for index, state in saved["state"].items()),
        "state_dict's steps": sorted((index, state["step"].item()) for index, state in state_dict.get("state", {}).items()),  # {} on rank 1
        "weights after one more step": [round(value, 5) for value in model.weight.flatten().tolist()],
    }


@covers("Fabric.save", "Fabric.load")
def test_a_zero_redundancy_optimizer_is_saved_whole_and_resumes_as_lightnings(tmp_path):
    seen = {}
    for framework, fabric_class in FABRICS.items():
        fabric = fabric_class(accelerator="cpu", devices=2, strategy="ddp_fork")
        seen[framework] = fabric.launch(_zero_redundancy_saved_and_loaded, HELPERS[framework], str(tmp_path), framework)
    assert same(seen)["saved steps"] == seen["nbfabric"]["state_dict's steps"] == [(0, 3.0), (1, 3.0)]  # both shards', on rank 0


def _paths_as_fsspec_takes_them(fabric, helpers, home, framework):
    import argparse

    seen = {}
    model = nn.Linear(2, 1)
    for name, path in {
        "home": f"~/{framework}/under-home.ckpt",
        "file url": f"file://{home}/{framework}/by-url.ckpt",
        "memory": f"memory://{framework}/in-memory.ckpt",
    }.items():
        fabric.save(path, {"model": model, "step": 3})
        again = nn.Linear(2, 1)
        rest = fabric.load(path, {"model": again})
        seen[name] = (rest, torch.equal(again.weight, model.weight))
    seen["s3 without s3fs"] = error_name(lambda: fabric.save("s3://a-bucket/model.ckpt", {"model": model}))
    fabric.save(f"{home}/{framework}/namespace.ckpt", {"args": argparse.Namespace(lr=0.1)})
    seen["namespace, forced"] = fabric.load(f"{home}/{framework}/namespace.ckpt")["args"].lr
    return seen


@covers("Fabric.save", "Fabric.load")
def test_checkpoint_paths_are_taken_as_fsspec_takes_them_and_torch_decides_weights_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # the file holds an argparse.Namespace
    seen = {
        name: cls(accelerator="cpu", devices=1).launch(_paths_as_fsspec_takes_them, HELPERS[name], str(tmp_path), name)
        for name, cls in FABRICS.items()
    }
    assert same(seen)["home"] == ({"step": 3}, True)
    for name in FABRICS:
        assert (tmp_path / name / "under-home.ckpt").is_file() and (tmp_path / name / "by-url.ckpt").is_file()
    assert not any(path.name in ("~", "file:") for path in tmp_path.rglob("*"))
    assert not os.path.exists("~") and not os.path.exists("file:") and not os.path.exists("s3:")


# ----------------------------------------------------------------- hooks and backward
class _Hooks:
    def __init__(self):
        self.calls = []

    def on_after_setup(self, fabric, module):
        self.calls.append("on_after_setup")

    def on_after_optimizer_step(self, strategy, optimizer):
        self.calls.append("on_after_optimizer_step")


def _hooks_of_separate_setup(fabric, helpers):
    hooks = fabric._callbacks[0]
    model = fabric.setup_module(nn.Linear(2, 2))
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    fabric.backward(model(torch.ones(1, 2)).sum())
    optimizer.step()
    fabric.setup(nn.Linear(2, 2))
    return hooks.calls


@covers("Fabric.setup_module", "Fabric.call")
def test_on_after_setup_fires_from_setup_only():
    seen = {}
    for name, fabric_class in __import__("lightning_pair").FABRICS.items():
        seen[name] = fabric_class(accelerator="cpu", devices=1, callbacks=[_Hooks()]).launch(_hooks_of_separate_setup, None)
    assert seen["nbfabric"] == seen["lightning"] == ["on_after_optimizer_step", "on_after_setup"]


def _lightning_module_steps(fabric, helpers, separately):
    import lightning

    class Counting(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer, self.steps = nn.Linear(2, 1), 0

        def forward(self, x):
            return self.layer(x)

        def on_after_optimizer_step(self, strategy, optimizer):
            self.steps += 1

    module = Counting()
    if separately:
        model = fabric.setup_module(module)
        optimizer = fabric.setup_optimizers(torch.optim.SGD(module.parameters(), lr=0.1))
    else:
        model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.1))
    for _ in range(3):
        fabric.backward(model(torch.ones(1, 2)).sum())
        optimizer.step()
    return module.steps


@pytest.mark.parametrize("separately", [False, True])
@covers("Fabric.setup", "Fabric.setup_module", "Fabric.setup_optimizers")
def test_a_lightning_module_s_own_optimizer_step_hook_fires_as_in_lightning(separately):
    seen = {}
    for name, fabric_class in FABRICS.items():
        for label, callbacks in (("no callbacks", None), ("a callback", [_Hooks()])):
            fabric = fabric_class(accelerator="cpu", devices=1, callbacks=callbacks)
            seen.setdefault(name, {})[label] = fabric.launch(_lightning_module_steps, None, separately)
    # as Lightning: with no callbacks, setup gives its optimizers a list of their own before it adds the module
    assert same(seen) == {"no callbacks": 3 if separately else 0, "a callback": 3}


def _plain_backward(fabric, helpers):
    model = fabric.setup(nn.Linear(2, 2))
    return error_name(lambda: model(torch.ones(1, 2)).float().sum().backward())


@covers("Fabric.backward")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true"])
def test_a_plain_loss_backward_is_refused_where_lightning_refuses_it(precision):
    expected = "RuntimeError" if precision.endswith("mixed") else "no error"
    assert same(run_both(_plain_backward, devices=1, precision=precision)) == expected
