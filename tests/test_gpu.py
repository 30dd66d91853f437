"""On a CUDA machine: NCCL, mixed precision with the gradient scaler, FSDP, DeepSpeed (fp16, bf16, offload), and the fork check."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from nbfabric import Fabric
from nbfabric.devices import detect_hardware

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(detect_hardware().cuda_count == 0, reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("no_leaks"),  # a leak fails the test that made it (tests/conftest.py)
]


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
    result = Fabric(accelerator="cuda", devices=1, strategy="ddp").launch(_steps)
    assert result["device"] == "cuda:0" and result["backend"] == "nccl"
    assert all(result["applied"])


def test_bf16_mixed_keeps_float32_parameters():
    result = Fabric(accelerator="cuda", devices=1, precision="bf16-mixed").launch(_steps)
    assert result["param_dtype"] == "torch.float32" and all(result["applied"])


def test_16_mixed_skips_the_step_with_infinite_gradients():
    result = Fabric(accelerator="cuda", devices=1, precision="16-mixed").launch(_steps, 2)
    assert result["applied"][2] is False
    assert result["applied"][3] is True


def test_fsdp_on_one_gpu():
    result = Fabric(accelerator="cuda", devices=1, strategy="fsdp").launch(_steps)
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
    result = Fabric(accelerator="cuda", devices=1, strategy=strategy, precision=precision).launch(_deepspeed_steps)
    assert result["sections"] == sections and result["engine_dtype"] == dtype
    assert all(loss == loss for loss in result["losses"]) and result["losses"][-1] < result["losses"][0]
    assert type(result["model"]) is torch.nn.Sequential and result["model"][0].weight.shape == (64, 32)
