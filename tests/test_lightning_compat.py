"""Lightning Fabric's documented patterns, run under `lightning.fabric` and `nbfabric` with only the
import swapped, on 2 CPU ranks each: the same results, or the same refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nbfabric
from lightning_pair import FABRICS, covers


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


@covers("_FabricModule.mark_forward_method", "_FabricModule.__getattr__")
def test_a_marked_method_keeps_the_ranks_in_sync():
    results = run_both(_train_through("loss_on", mark=True))
    assert results["nbfabric"] == results["lightning"] == ("trained", True, 4)


@covers("_FabricModule.__getattr__")
def test_training_step_runs_through_the_wrapper_without_marking():
    results = run_both(_train_through("training_step", mark=False))
    assert results["nbfabric"] == results["lightning"] == ("trained", True, 4)


def test_an_unmarked_method_that_runs_layers_is_refused_not_left_out_of_sync():
    results = run_both(_train_through("loss_on", mark=False))
    assert results["nbfabric"] == results["lightning"] == ("refused", True)


@covers("_FabricModule.mark_forward_method")
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
    counts = torch.tensor([rank + 1, 4])
    seen["mean of integers"] = (fabric.all_reduce(counts, reduce_op="mean") is counts, str(counts.dtype), counts.tolist())
    seen["bitwise"] = [fabric.all_reduce(torch.tensor([rank + 1, 3]), reduce_op=op).tolist() for op in ("band", "BOR", "bxor", dist.ReduceOp.BAND)]
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


@covers("Fabric.all_reduce", "Fabric.all_gather", "Fabric.broadcast")
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


@pytest.mark.parametrize("name", FABRICS)
def test_a_collective_before_launch_says_to_launch(name):
    fabric = FABRICS[name](accelerator="cpu", devices=2)
    with pytest.raises(RuntimeError, match="launch"):
        fabric.all_reduce(1)


class _Recorder:
    """A callback whose hooks take fewer arguments than Fabric passes."""

    def __init__(self):
        self.calls = []

    def on_after_setup(self, module):
        self.calls.append(("on_after_setup", type(module).__name__ == "FabricModule" or type(module).__name__ == "_FabricModule"))

    def on_after_optimizer_step(self, strategy, optimizer):
        self.calls.append(("on_after_optimizer_step", isinstance(optimizer, torch.optim.SGD)))

    def on_epoch_end(self, results):
        self.calls.append(("on_epoch_end", results))


def _callbacks(fabric):
    recorder = fabric._callbacks[0]
    model, optimizer = fabric.setup(nn.Linear(2, 1), torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1))
    optimizer.zero_grad()
    fabric.backward(model(torch.ones(1, 2)).sum())
    optimizer.step()
    fabric.call("on_epoch_end", results={"loss": 1.0}, unused="dropped")
    return recorder.calls


@covers("Fabric.call", "Fabric.setup")
def test_callbacks_get_the_hooks_fabric_fires_and_only_the_arguments_they_take():
    results = {name: cls(accelerator="cpu", devices=1, callbacks=[_Recorder()]).launch(_callbacks) for name, cls in FABRICS.items()}
    assert results["nbfabric"] == results["lightning"] == [
        ("on_after_setup", True), ("on_after_optimizer_step", True), ("on_epoch_end", {"loss": 1.0})
    ]


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        return index


class _NamedLoader(torch.utils.data.DataLoader):
    """A DataLoader subclass with an attribute of its own."""

    def __init__(self, *args, name="train", **kwargs):
        super().__init__(*args, **kwargs)
        self.name = name


class _EvenFirst(torch.utils.data.Sampler):
    def __init__(self, size):
        self.size = size

    def __iter__(self):
        return iter([*range(0, self.size, 2), *range(1, self.size, 2)])

    def __len__(self):
        return self.size


class _Pairs(torch.utils.data.Sampler):
    """A custom batch sampler that draws from a sampler."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        batch = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == 2:
                yield batch
                batch = []

    def __len__(self):
        return len(self.sampler) // 2


def _loaders(fabric):
    fabric.seed_everything(7, verbose=False)
    shuffled = _NamedLoader(_Numbers(), batch_size=2, shuffle=True, name="mine")
    custom = torch.utils.data.DataLoader(_Numbers(), sampler=_EvenFirst(10), batch_size=3)
    loaders = fabric.setup_dataloaders(shuffled, custom)
    return {
        "several": type(loaders).__name__,
        "subclass": (type(loaders[0].loader if hasattr(loaders[0], "loader") else loaders[0]._dataloader).__name__, loaders[0].name),
        "device": str(loaders[0].device),
        "batches": [[batch.tolist() for batch in loader] for loader in loaders],
    }


@covers("Fabric.setup_dataloaders")
def test_dataloaders_are_sharded_seeded_and_kept_as_lightning_does():
    results = run_both(_loaders)
    assert results["nbfabric"] == results["lightning"]
    assert results["nbfabric"]["subclass"] == ("_NamedLoader", "mine") and results["nbfabric"]["several"] == "list"


class _Precomputed(torch.utils.data.Sampler):
    """A batch sampler that makes its batches when it is made, as bucketing samplers do."""

    def __init__(self, sampler, batch_size, drop_last):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        indices = list(sampler)
        self.batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class _Buckets(torch.utils.data.BatchSampler):
    """A subclass of torch's BatchSampler with an argument of its own."""

    def __init__(self, sampler, batch_size, drop_last, reverse=False):
        super().__init__(sampler, batch_size, drop_last)
        self.reverse = reverse

    def __iter__(self):
        for batch in super().__iter__():
            yield batch[::-1] if self.reverse else batch


class _Fixed(torch.utils.data.BatchSampler):
    """A BatchSampler subclass made from a size alone (no `sampler` argument)."""

    def __init__(self, size):
        super().__init__(torch.utils.data.SequentialSampler(range(size)), 2, False)


def _custom_batch_samplers(fabric, made_before):
    fabric.seed_everything(3, verbose=False)
    sequential, shuffled = torch.utils.data.SequentialSampler(range(10)), torch.utils.data.RandomSampler(range(10))
    given = {
        "made before launch": made_before,
        "precomputed": _Precomputed(sequential, 3, False),
        "subclass with its own argument": _Buckets(sequential, 2, False, reverse=True),
        "subclass over a random sampler": _Buckets(shuffled, 2, True),
        "no batch_size": _Pairs(sequential),
        "no sampler argument": _Fixed(10),
    }
    seen = {}
    for name, batch_sampler in given.items():
        loader = torch.utils.data.DataLoader(_Numbers(), batch_sampler=batch_sampler)
        try:
            set_up = fabric.setup_dataloaders(loader)
        except TypeError:
            seen[name] = "TypeError"
            continue
        seen[name] = (type(set_up.sampler).__name__, len(set_up), [batch.tolist() for batch in set_up])
    return seen


@covers("Fabric.setup_dataloaders")
def test_a_custom_batch_sampler_is_made_again_over_the_rank_s_share_or_refused_as_lightning_does():
    made_before = _Buckets(torch.utils.data.SequentialSampler(range(10)), 4, False, reverse=True)
    results = {name: cls(accelerator="cpu", devices=2, strategy="ddp_fork").launch(_custom_batch_samplers, made_before) for name, cls in FABRICS.items()}
    assert results["nbfabric"] == results["lightning"]
    seen = results["nbfabric"]
    assert seen["precomputed"] == ("SequentialSampler", 2, [[0, 2, 4], [6, 8]])  # rank 0's share, batched anew
    assert seen["subclass with its own argument"][2] == [[2, 0], [6, 4], [8]]
    assert seen["made before launch"][2] == [[0, 2, 4, 6], [8]]  # made again as a BatchSampler is: reverse=True lost, as in Lightning
    assert seen["no batch_size"] == seen["no sampler argument"] == "TypeError"


def _setup_details(fabric):
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    returned = fabric.setup(model, optimizer, scheduler=scheduler)
    again = []
    for first in (returned[0], returned[1]):
        try:
            fabric.setup(first) if first is returned[0] else fabric.setup(nn.Linear(1, 1), first)
        except ValueError as error:
            again.append("only once" in str(error))
    compiled = fabric.setup(torch.compile(nn.Linear(2, 2)))
    return {"returned": len(returned), "scheduler": returned[2] is scheduler, "twice refused": again, "compiled keys": sorted(compiled.state_dict())}


@covers("Fabric.setup")
def test_setup_takes_a_scheduler_refuses_a_second_setup_and_unwraps_compiled_state():
    results = run_both(_setup_details)
    assert results["nbfabric"] == results["lightning"]
    assert results["nbfabric"]["compiled keys"] == ["bias", "weight"] and results["nbfabric"]["twice refused"] == [True, True]


def _save_filtered(fabric, path):
    model = nn.Linear(2, 2)
    fabric.save(path / "filtered.pt", {"model": model, "step": 3}, filter={"model": lambda name, value: "bias" not in name})
    saved = torch.load(path / "filtered.pt", weights_only=True)
    into = nn.Linear(2, 2)
    torch.save(model.state_dict(), path / "raw.pt")
    fabric.load_raw(path / "raw.pt", into, weights_only=True)
    errors = []
    for bad in ({"missing": lambda n, v: True}, {"model": 3}, [1]):
        try:
            fabric.save(path / "bad.pt", {"model": model}, filter=bad)
        except (TypeError, ValueError) as error:
            errors.append(type(error).__name__)
    return {"keys": sorted(saved["model"]), "step": saved["step"], "raw": torch.equal(into.weight, model.weight), "errors": errors}


def test_save_filter_and_load_raw_weights_only_as_lightning(tmp_path):
    results = {}
    for name, cls in FABRICS.items():
        (tmp_path / name).mkdir()
        results[name] = cls(accelerator="cpu", devices=1).launch(_save_filtered, tmp_path / name)
    assert results["nbfabric"] == results["lightning"] == {"keys": ["weight"], "step": 3, "raw": True, "errors": ["ValueError", "TypeError", "TypeError"]}


def _csv_logging(fabric, path):
    logger = fabric.logger
    fabric.log("loss", float(fabric.global_rank))
    logger.finalize("success")
    fabric.barrier()
    return sorted(str(p.relative_to(path)) for p in path.rglob("metrics.csv"))


@covers("Fabric.logger", "loggers.CSVLogger")
def test_a_rank_zero_only_logger_writes_once(tmp_path):
    from lightning.fabric.loggers import CSVLogger

    results = {}
    for name, cls in FABRICS.items():
        directory = tmp_path / name
        results[name] = cls(accelerator="cpu", devices=2, strategy="ddp_fork", loggers=CSVLogger(directory)).launch(_csv_logging, directory)
    assert results["nbfabric"] == results["lightning"] == ["lightning_logs/version_0/metrics.csv"]


class _TwoHeads(nn.Module):
    """A model one of whose layers takes no part in the loss: DDP needs find_unused_parameters."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(2, 1), nn.Linear(2, 1)

    def forward(self, x):
        return self.used(x)


def _unused_head(fabric):
    model, optimizer = fabric.setup(_TwoHeads(), torch.optim.SGD(_TwoHeads().parameters(), lr=0.1))
    for _ in range(2):
        optimizer.zero_grad()
        fabric.backward(model(torch.ones(2, 2)).sum())
        optimizer.step()
    return (fabric.accelerator is not None, str(fabric.strategy.root_device), fabric.world_size)


@pytest.mark.parametrize("strategy", ["ddp_find_unused_parameters_true", "object"])
def test_ddp_options_reach_distributed_data_parallel(strategy):
    from lightning.fabric.strategies import DDPStrategy as LightningDDP

    from nbfabric.strategies import DDPStrategy

    # Lightning's string starts a script launcher (it would run pytest again): its fork form stands in
    lightning = FABRICS["lightning"](accelerator="cpu", devices=2, strategy=LightningDDP(find_unused_parameters=True, start_method="fork"))
    ours = nbfabric.Fabric(accelerator="cpu", devices=2, strategy=strategy if strategy != "object" else DDPStrategy(find_unused_parameters=True))
    assert ours.launch(_unused_head) == lightning.launch(_unused_head) == (True, "cpu", 2)


_SEEN_BY_FORKED_RANKS = {"set before the launch": False}


def _started_fresh(fabric):
    return not _SEEN_BY_FORKED_RANKS["set before the launch"]


def test_ddp_spawn_starts_fresh_interpreters(monkeypatch):
    fabric = nbfabric.Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    monkeypatch.setitem(_SEEN_BY_FORKED_RANKS, "set before the launch", True)
    assert fabric.config.start_method == "spawn" and fabric.launch(_started_fresh) is True


def test_unknown_strategy_options_are_refused_naming_the_valid_ones():
    from nbfabric.strategies import DDPStrategy, FSDPStrategy

    with pytest.raises(TypeError, match="find_unused_parameters"):
        DDPStrategy(find_unused=True)
    with pytest.raises(TypeError, match="auto_wrap_policy"):
        FSDPStrategy(limit_all_gathers=True)


def _accumulate_and_clip(fabric):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.5))
    norms = []
    for step in range(4):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * step + fabric.global_rank))
        accumulating = step % 2 == 0
        with fabric.no_backward_sync(model, enabled=accumulating):
            fabric.backward(model(x).pow(2).mean())
        if not accumulating:
            norms.append(round(float(fabric.clip_gradients(model, optimizer, max_norm=0.1)), 5))
            optimizer.step()
            optimizer.zero_grad()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return norms, [round(v, 5) for v in weights.tolist()], bool(torch.equal(*fabric.all_gather(weights)))


@covers("Fabric.no_backward_sync", "Fabric.clip_gradients")
def test_accumulation_without_sync_and_clipping_match_lightning():
    results = run_both(_accumulate_and_clip)
    assert results["nbfabric"] == results["lightning"]
    assert results["nbfabric"][2] is True  # the ranks agree after the synchronised steps


def _save(fabric, path):
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    model, optimizer = fabric.setup(model, torch.optim.Adam(model.parameters(), lr=0.1))
    fabric.backward(model(torch.ones(4, 3)).sum())
    optimizer.step()
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 5})


def _resume(fabric, path):
    model = nn.Linear(3, 2)
    model, optimizer = fabric.setup(model, torch.optim.Adam(model.parameters(), lr=0.1))
    state = {"model": model, "optimizer": optimizer, "step": 0}
    rest = fabric.load(path, state)
    fabric.backward(model(torch.ones(4, 3)).sum())
    optimizer.step()
    return state["step"], rest, [round(v, 6) for v in torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()]


@covers("Fabric.save", "Fabric.load")
@pytest.mark.parametrize(("writer", "reader"), [("lightning", "nbfabric"), ("nbfabric", "lightning")])
def test_a_checkpoint_saved_by_one_resumes_in_the_other(tmp_path, writer, reader):
    path = tmp_path / "checkpoint.pt"
    FABRICS[writer](accelerator="cpu", devices=2, strategy="ddp_fork").launch(_save, path)
    resumed = FABRICS[reader](accelerator="cpu", devices=2, strategy="ddp_fork").launch(_resume, path)
    FABRICS[writer](accelerator="cpu", devices=2, strategy="ddp_fork").launch(_save, tmp_path / "same.pt")
    own = FABRICS[writer](accelerator="cpu", devices=2, strategy="ddp_fork").launch(_resume, tmp_path / "same.pt")
    assert resumed == own and resumed[0] == 5
