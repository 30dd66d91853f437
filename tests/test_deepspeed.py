"""DeepSpeed ZeRO 1-3 on 2 CPU ranks (gloo): training equal to DDP, save, resume, consolidate; bad settings refused up front."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)

pytest.importorskip("deepspeed")

from nbfabric import Fabric, RunConfig  # noqa: E402
from nbfabric.consolidate import consolidate  # noqa: E402
from nbfabric.strategies import DeepSpeedStrategy  # noqa: E402

# DeepSpeed's flat fp32 buffers sum gradients in another order than DDP's buckets: equal to float32 rounding.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


def _steps(fabric: Fabric, model, optimizer, first: int, last: int) -> list[float]:
    losses = []
    for step in range(first, last):
        generator = torch.Generator().manual_seed(100 * step + fabric.global_rank)
        x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 2, generator=generator)
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        losses.append(fabric.all_reduce(loss.detach()).item())
    return losses


def _setup(fabric: Fabric):
    model = _model()
    return fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def _train_and_save(fabric: Fabric, path: str, steps: int) -> dict:
    model, optimizer = _setup(fabric)
    losses = _steps(fabric, model, optimizer, 0, steps)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": steps, "note": "kept"})
    local = sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters())
    return {"losses": losses, "model": model, "local_counts": fabric.all_gather(torch.tensor(local)).tolist()}


def _resume(fabric: Fabric, path: str, steps: int) -> dict:
    model, optimizer = _setup(fabric)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    rest = fabric.load(path, state)
    losses = _steps(fabric, model, optimizer, state["step"], state["step"] + steps)
    return {"losses": losses, "model": model, "rest": rest, "step": state["step"]}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """DDP's losses over 6 steps, and its weights after 4 and after 6 steps."""

    def run(fabric: Fabric) -> dict:
        model, optimizer = _setup(fabric)
        first = _steps(fabric, model, optimizer, 0, 4)
        after_four = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        return {"losses": first + _steps(fabric, model, optimizer, 4, 6), "after_four": after_four, "model": model}

    return Fabric(accelerator="cpu", devices=2, strategy="ddp").launch(run)


def _assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, **TOLERANCE)


@pytest.mark.parametrize("strategy", ["deepspeed_stage_1", "deepspeed_stage_2", DeepSpeedStrategy(stage=3)], ids=["zero1", "zero2", "zero3"])
def test_each_zero_stage_trains_as_ddp_saves_resumes_and_consolidates(strategy, ddp, tmp_path):
    path = tmp_path / "checkpoint"
    first = Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(_train_and_save, str(path), 4)
    torch.testing.assert_close(first["losses"], ddp["losses"][:4], **TOLERANCE)
    assert type(first["model"]) is nn.Sequential  # an ordinary module with full weights, also after ZeRO-3
    _assert_same_weights(first["model"].state_dict(), ddp["after_four"])
    total = sum(p.numel() for p in _model().parameters())
    assert sum(first["local_counts"]) == (total if "3" in str(getattr(strategy, "stage", strategy)) else 2 * total)

    resumed = Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(_resume, str(path), 2)
    assert resumed["step"] == 4 and resumed["rest"] == {"note": "kept"}
    torch.testing.assert_close(resumed["losses"], ddp["losses"][4:], **TOLERANCE)  # momentum came back too
    _assert_same_weights(resumed["model"].state_dict(), ddp["model"].state_dict())

    with pytest.raises(ValueError, match="was written under DeepSpeed: load it with a DeepSpeed strategy, or make one file of it"):
        Fabric(accelerator="cpu", devices=1).load(path, {"model": _model()})
    written = consolidate(path, tmp_path / "full.pt")
    full = torch.load(written, weights_only=True)
    assert full["step"] == 4 and full["note"] == "kept"
    _assert_same_weights(full["model"], ddp["after_four"])


def _refusals(fabric: Fabric, weights: str) -> list[str]:
    model, optimizer = _setup(fabric)
    refused = []
    for attempt in (
        lambda: fabric.save("unused", {"model": model}, filter={"model": lambda name, value: True}),
        lambda: fabric.clip_gradients(model, optimizer, max_norm=1.0),
        lambda: fabric.no_backward_sync(model),
        lambda: fabric.load("not-a-checkpoint", {"model": model}),
        lambda: fabric.setup(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), torch.optim.SGD(_model().parameters(), lr=0.1)),
        lambda: fabric.load_raw(weights, model),  # its next step would undo it: the engine keeps its own copy
        lambda: fabric.load_raw(weights, optimizer),
    ):
        try:
            attempt()
        except (ValueError, RuntimeError, NotImplementedError) as error:
            refused.append(str(error))
    return refused


def test_what_deepspeed_cannot_do_is_refused_with_the_way_on(tmp_path):
    torch.save(_model().state_dict(), tmp_path / "weights.pt")
    refused = Fabric(accelerator="cpu", devices=2, strategy="deepspeed").launch(_refusals, str(tmp_path / "weights.pt"))
    assert len(refused) == 7
    expected = ["filter", "gradient_clipping", "gradient_accumulation_steps", "not a checkpoint", "exactly one optimizer", "before fabric.setup", "before fabric.setup"]
    for expected, message in zip(expected, refused):
        assert expected in message


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DeepSpeedStrategy(stage=4), "1, 2 or 3"),
        (lambda: DeepSpeedStrategy(stage=2, offload_parameters=True), "needs ZeRO stage 3"),
        (lambda: DeepSpeedStrategy(config="/no/such/ds_config.json"), "readable JSON file"),
        (lambda: Fabric(accelerator="cpu", devices=2, strategy="deepspeed", precision="64-true"), "not accelerator='cpu' with precision='64-true'"),
        (lambda: RunConfig.resolve(accelerator="cpu", devices=2, strategy="deepspeed_stage_4"), "deepspeed_stage_3_offload"),
    ],
)
def test_bad_settings_are_refused_before_any_rank_starts(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_missing_or_old_deepspeed_is_named_with_the_extra(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    with pytest.raises(ImportError, match=r"pip install 'nbfabric\[deepspeed\]'"):
        Fabric(accelerator="cpu", devices=2, strategy="deepspeed_stage_3")
    with pytest.raises(ImportError, match=r"pip install 'nbfabric\[deepspeed\]'"):  # as %%fabric and nbfabric run check their flags
        RunConfig.resolve(accelerator="cpu", devices=2, strategy="deepspeed")
    monkeypatch.setattr(metadata, "version", lambda name: "0.9.5")
    with pytest.raises(ImportError, match=r"deepspeed>=0.19 .* has 0.9.5"):
        Fabric(accelerator="cpu", devices=2, strategy=DeepSpeedStrategy(stage=1))


def test_a_json_config_is_used_as_given_and_the_launching_process_never_imports_deepspeed(tmp_path):
    config = tmp_path / "ds_config.json"
    config.write_text('{"zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": true, "train_micro_batch_size_per_gpu": 4}')
    script = f"""
import sys, torch
from nbfabric import Fabric
from nbfabric.strategies import DeepSpeedStrategy

def run(fabric):
    model = torch.nn.Linear(4, 4)
    fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    engine = fabric.strategy._engine
    return engine.zero_optimization_stage(), engine.train_micro_batch_size_per_gpu()

result = Fabric(accelerator="cpu", devices=2, strategy=DeepSpeedStrategy(config={str(config)!r})).launch(run)
print(result, "deepspeed" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "(3, 4) False"


def test_on_one_device_each_stage_trains_here_as_plain_pytorch_again_and_again_and_leaves_no_trace():
    """A run of one process happens in the calling process (as Lightning's), where no launcher set
    the LOCAL_RANK that DeepSpeed's engine reads; each run there, and ranks forked after them, train
    anew. The plain loop clips gradients at norm 1, DeepSpeed's default `gradient_clipping`, which
    Lightning keeps too. In a child process: the leak check stays blind to what importing DeepSpeed leaves."""
    script = """
import os, torch, torch.nn.functional as F
from nbfabric import Fabric

def losses(fabric=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if fabric is not None:
        model, optimizer = fabric.setup(model, optimizer)
    found = []
    for step in range(5):  # the same batches on every rank
        generator = torch.Generator().manual_seed(step)
        loss = F.mse_loss(model(torch.randn(16, 8, generator=generator)), torch.randn(16, 2, generator=generator))
        optimizer.zero_grad()
        if fabric is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            fabric.backward(loss)
        optimizer.step()
        found.append(loss.item())
    return found

before = dict(os.environ)
plain = losses()
for devices, strategy in [(1, "deepspeed_stage_1"), (1, "deepspeed_stage_2"), (1, "deepspeed_stage_3"), (1, "deepspeed_stage_2_offload"), (2, "deepspeed_stage_3")]:
    torch.testing.assert_close(Fabric(accelerator="cpu", devices=devices, strategy=strategy).launch(losses), plain, rtol=1e-5, atol=1e-6)
    print(devices, strategy, "trained as plain PyTorch; environment unchanged:", dict(os.environ) == before)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained as plain PyTorch; environment unchanged: True") == 5, done.stdout


def test_a_fabric_cell_trains_with_zero3_and_the_model_comes_back_whole(tmp_path):
    from test_magic import Kernel

    kernel = Kernel(tmp_path / "none.json")
    try:
        kernel.run("import sys\nfrom torch import nn\nmodel = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))")
        out = kernel.run(
            """
            %%fabric --accelerator=cpu --devices=2 --strategy=deepspeed_stage_3
            model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
            for _ in range(3):
                loss = model(torch.randn(4, 8)).pow(2).mean()
                fabric.backward(loss)
                optimizer.step()
            held = sum(p.ds_tensor.numel() for p in model.parameters())
            """
        )
        assert out["error"] is None, out["error"]
        check = kernel.run("(type(model).__name__, [tuple(p.shape) for p in model.parameters()], held, 'deepspeed' in sys.modules)")
        assert check["result"] == "('Sequential', [(32, 8), (32,), (2, 32), (2,)], 177, False)"  # rank 0 held half of the 354
        kernel.assert_no_ranks_left()
    finally:
        kernel.close()


def _save_an_object(fabric: Fabric, path: str) -> None:
    from fractions import Fraction

    model, optimizer = _setup(fabric)
    fabric.save(path, {"model": model, "optimizer": optimizer, "ratio": Fraction(1, 3)})


def _load(fabric: Fabric, path: str, weights_only: bool):
    model, optimizer = _setup(fabric)
    return fabric.load(path, {"model": model, "optimizer": optimizer}, weights_only=weights_only)


def test_a_checkpoint_holding_other_objects_loads_only_when_trusted(tmp_path):
    from fractions import Fraction

    path = str(tmp_path / "checkpoint")
    Fabric(accelerator="cpu", devices=2, strategy="deepspeed").launch(_save_an_object, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        Fabric(accelerator="cpu", devices=2, strategy="deepspeed").launch(_load, path, True)
    assert Fabric(accelerator="cpu", devices=2, strategy="deepspeed").launch(_load, path, False) == {"ratio": Fraction(1, 3)}
    with pytest.raises(Exception, match="Weights only load failed"):
        consolidate(path, tmp_path / "full.pt")
    assert torch.load(consolidate(path, tmp_path / "full.pt", trusted=True), weights_only=False)["ratio"] == Fraction(1, 3)


def test_nbfabric_run_trains_a_script_with_zero3_and_consolidate_makes_one_file(tmp_path):
    import os

    script = tmp_path / "train.py"
    script.write_text(
        "import sys, torch\nfrom nbfabric import Fabric\n"
        "fabric = Fabric()\nfabric.launch()\n"
        "model = torch.nn.Linear(4, 2)\n"
        "model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))\n"
        "fabric.backward(model(torch.ones(3, 4)).sum())\noptimizer.step()\n"
        f"fabric.save({str(tmp_path / 'checkpoint')!r}, {{'model': model, 'optimizer': optimizer, 'epoch': 1}})\n"
        "print(fabric.strategy.stage, 'deepspeed' in sys.modules)\n"
    )
    env = {**os.environ, "NBFABRIC_CONFIG": str(tmp_path / "no-settings.json")}
    command = [sys.executable, "-m", "nbfabric"]
    done = subprocess.run([*command, "run", "--accelerator=cpu", "--devices=2", "--strategy=deepspeed_stage_3", str(script)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "[rank 0] 3 True" in done.stdout and "[rank 1] 3 True" in done.stdout
    done = subprocess.run([*command, "consolidate", str(tmp_path / "checkpoint"), str(tmp_path / "full.pt")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert full["epoch"] == 1 and full["model"]["weight"].shape == (2, 4)
