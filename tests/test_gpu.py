"""On a CUDA machine: NCCL, mixed precision with the gradient scaler, FSDP, DeepSpeed (fp16, bf16, offload), and the fork check."""

from __future__ import annotations

import multiprocessing
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from nbfabric import Fabric
from nbfabric.devices import detect_hardware
from nbfabric.wrappers import to_cpu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(detect_hardware().cuda_count == 0, reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("no_leaks"),  # a leak fails the test that made it (tests/conftest.py)
]


def _launched(settings: dict, function, *args):
    """The run's value on the CPU: one device returns it as it is, on the GPU, which the trip back
    to this process would take along (and initialise CUDA here)."""
    return to_cpu(Fabric(**settings).launch(function, *args))


def in_a_fresh_process(function, *args):
    """`function(*args)` in a new interpreter. One device runs in the process that launches (as
    Lightning's), and the CUDA it initialises stays for the process's life: here it would leave
    this one unable to fork the ranks of the tests after these."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result(timeout=600)


def _steps(fabric: Fabric, poison_step: int | None = None) -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.01))
    applied = []
    for step in range(4):
        x = torch.randn(8, 32, device=fabric.device)
        output = model(x)
        loss = F.mse_loss(output.float(), torch.zeros_like(output.float()))
        if step == poison_step:
            loss = loss * float("inf")
        before = next(iter(model.parameters())).detach().clone()
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        applied.append(not torch.equal(before, next(iter(model.parameters())).detach()))
    return {
        "device": str(fabric.device),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "param_dtype": str(next(iter(model.parameters())).dtype),
        "output_dtype": str(output.dtype),
        "applied": applied,
    }


def test_ddp_on_nccl_with_one_rank():
    result = in_a_fresh_process(_launched, dict(accelerator="cuda", devices=1, strategy="ddp"), _steps)
    assert result["device"] == "cuda:0" and result["backend"] == "nccl"
    assert all(result["applied"])


def test_bf16_mixed_keeps_float32_parameters():
    result = in_a_fresh_process(_launched, dict(accelerator="cuda", devices=1, precision="bf16-mixed"), _steps)
    assert result["param_dtype"] == "torch.float32" and all(result["applied"])


def test_16_mixed_skips_the_step_with_infinite_gradients():
    result = in_a_fresh_process(_launched, dict(accelerator="cuda", devices=1, precision="16-mixed"), _steps, 2)
    assert result["applied"][2] is False
    assert result["applied"][3] is True


def test_fsdp_on_one_gpu():
    result = in_a_fresh_process(_launched, dict(accelerator="cuda", devices=1, strategy="fsdp"), _steps)
    assert result["device"] == "cuda:0" and all(result["applied"])


def test_fork_is_refused_after_cuda_init_and_spawn_works(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            from nbfabric import Fabric, ForkUnsafeError

            def device(fabric):
                return str(torch.ones(1, device=fabric.device).device)

            if __name__ == "__main__":
                torch.ones(1, device="cuda")
                try:
                    fabric = Fabric(accelerator="cuda", devices=1, strategy="ddp")
                    fabric._launch(device, new_processes=True)
                except ForkUnsafeError as error:
                    print("refused:", error)
                fabric = Fabric(accelerator="cuda", devices=1, strategy="ddp", start_method="spawn")
                print("spawned:", fabric._launch(device, new_processes=True))
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "refused: CUDA is already initialised" in done.stdout
    assert "spawned: cuda:0" in done.stdout


def _deepspeed_steps(fabric: Fabric) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.05))
    x, y = torch.randn(16, 32, device=fabric.device), torch.randn(16, 1, device=fabric.device)
    losses = []
    for _ in range(8):
        loss = F.mse_loss(model(x).float(), y)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        losses.append(loss.item())
    engine = fabric.strategy._engine
    return {
        "losses": losses,
        "sections": (engine.fp16_enabled(), engine.bfloat16_enabled()),
        "engine_dtype": str(next(engine.module.parameters()).dtype),
        "model": model,
    }


@pytest.mark.parametrize(
    ("strategy", "precision", "sections", "dtype"),
    [
        ("deepspeed_stage_2", "16-mixed", (True, False), "torch.float16"),
        ("deepspeed_stage_3", "bf16-mixed", (False, True), "torch.bfloat16"),
        ("deepspeed_stage_2_offload", "16-mixed", (True, False), "torch.float16"),
        ("deepspeed_stage_3_offload", "bf16-mixed", (False, True), "torch.bfloat16"),
    ],
)
def test_deepspeed_in_16_bit_and_with_cpu_offload(strategy, precision, sections, dtype):
    pytest.importorskip("deepspeed")
    result = in_a_fresh_process(_launched, dict(accelerator="cuda", devices=1, strategy=strategy, precision=precision), _deepspeed_steps)
    assert result["sections"] == sections and result["engine_dtype"] == dtype
    assert all(loss == loss for loss in result["losses"]) and result["losses"][-1] < result["losses"][0]
    assert type(result["model"]) is torch.nn.Sequential and result["model"][0].weight.shape == (64, 32)



def _compared_steps(fabric) -> list[float]:
    """Eight SGD steps with momentum, large enough that DeepSpeed's default gradient clipping acts."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    losses = []
    for step in range(8):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(64, 32, generator=generator), torch.randn(64, 4, generator=generator)
        loss = F.mse_loss(model(x.to(fabric.device)).float(), y.to(fabric.device))
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        losses.append(loss.item())
    return losses


def _ours_then_lightnings(settings: dict) -> tuple[list[float], list[float]]:
    """nbfabric releases its process group after the run; Lightning's keeps it, so it goes second."""
    import lightning as L

    return Fabric(**settings).launch(_compared_steps), L.Fabric(**settings).launch(_compared_steps)


@pytest.mark.parametrize(
    ("strategy", "precision"),
    [
        *(("auto", precision) for precision in ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")),
        ("deepspeed_stage_1", "32-true"),
        ("deepspeed_stage_2", "16-mixed"),
        ("deepspeed_stage_3", "bf16-mixed"),
        ("fsdp", "bf16-mixed"),
    ],
)
def test_one_gpu_trains_exactly_as_lightning_does(strategy, precision):
    pytest.importorskip("lightning")
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    ours, lightnings = in_a_fresh_process(_ours_then_lightnings, dict(accelerator="cuda", devices=1, strategy=strategy, precision=precision))
    # the same kernels in the same order: equal but for DeepSpeed's and FSDP's bucketing of gradients
    torch.testing.assert_close(ours, lightnings, rtol=1e-5, atol=1e-6, msg=f"nbfabric {ours} against Lightning {lightnings}")

# --- in a real kernel: what a notebook user on one GPU does ---------------------------------------

BF16_TRAINING = """%%fabric --accelerator=cuda --devices=1 --precision=bf16-mixed --widgets
import time, torch.nn.functional as F
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1))
model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
x, y = torch.randn(512, 256, device=fabric.device), torch.randn(512, 1, device=fabric.device)
losses, started = [], time.monotonic()
while time.monotonic() - started < 2.5 or len(losses) < 20:  # long enough for the usage sampler to see the GPU
    loss = F.mse_loss(model(x).float(), y)
    optimizer.zero_grad()
    fabric.backward(loss)
    optimizer.step()
    losses.append(loss.item())
with fabric.autocast():
    dtypes = (str(model(x).dtype), str((x @ x.T).dtype))  # outputs in float32, as Lightning; matmuls in bf16
print("device", fabric.device, "steps", len(losses))
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    from test_magic import Kernel

    kernel = Kernel(tmp_path_factory.mktemp("settings") / "none.json")
    yield kernel
    kernel.close()


def test_a_bf16_cell_trains_on_the_gpu_and_its_model_comes_back_on_the_cpu_without_cuda_in_the_kernel(kernel):
    out = kernel.run(BF16_TRAINING, timeout=300)
    assert out["error"] is None, out
    assert "[rank 0] device cuda:0" in out["stdout"]
    assert re.search(r"rank 0: done \(\d+ lines?, peak [\d.]+ [KMG]B, GPU [\d.]+ [KMG]B\)", "\n".join(out["displays"])), out["displays"]
    checks = "(next(model.parameters()).device.type, next(model.parameters()).dtype, dtypes, losses[-1] < losses[0], torch.cuda.is_initialized())"
    assert kernel.run(checks)["result"] == "('cpu', torch.float32, ('torch.float32', 'torch.bfloat16'), True, False)"
    kernel.assert_no_ranks_left()


def test_once_the_kernel_touched_cuda_a_fork_cell_is_refused_naming_the_line_and_a_spawn_cell_runs(kernel):
    kernel.run("x = torch.ones(3)\non_gpu = x.to('cuda')")
    refused = kernel.run("%%fabric --accelerator=cuda --devices=1\nfabric.world_size")
    assert refused["error"] is not None and refused["error"]["ename"] == "ForkUnsafeError"
    assert "CUDA is already initialised" in refused["error"]["evalue"], refused["error"]
    assert re.search(r"It was initialised at Cell In\[\d+\], line 2\.", refused["error"]["evalue"]), refused["error"]
    spawned = kernel.run("%%fabric --accelerator=cuda --devices=1 --start-method=spawn\ntotal = fabric.all_reduce(x.to(fabric.device)).sum()", timeout=300)
    assert spawned["error"] is None, spawned
    assert kernel.run("(total.device.type, total.item())")["result"] == "('cpu', 3.0)"
    kernel.assert_no_ranks_left()


def test_a_model_stays_on_the_gpu_of_a_pool_rank_between_cells(kernel):
    out = kernel.run("%fabric start --devices=1 --accelerator=cuda --engines=local", timeout=300)
    assert out["error"] is None, out
    try:
        pool = "%%fabric --no-widgets\n"
        first = kernel.run(pool + "model = fabric.setup(torch.nn.Linear(8, 8))\nstarts_on = str(next(model.parameters()).device)", timeout=300)
        assert first["error"] is None, first
        second = kernel.run(pool + "stays_on = str(next(model.parameters()).device)\nsame = stays_on == starts_on", timeout=300)
        assert second["error"] is None, second
        assert kernel.run("(starts_on, stays_on, same)")["result"] == "('cuda:0', 'cuda:0', True)"
    finally:
        kernel.run("%fabric stop-pool")
