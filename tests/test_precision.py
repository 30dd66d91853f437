"""What each precision setting does to parameters, activations, outputs, gradients and created tensors."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from torch import nn

from nbfabric import Fabric

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

# precision -> (parameters after setup, input seen by forward, activation inside forward, output returned, gradients)
EXPECTED = {
    "32-true": (F32, F32, F32, F32, F32),
    "bf16-mixed": (F32, BF16, BF16, F32, F32),  # inputs in 16 bits, as Lightning converts them
    "bf16-true": (BF16, BF16, BF16, F32, BF16),
    "16-true": (F16, F16, F16, F32, F16),
    "64-true": (F64, F64, F64, F32, F64),
}
# precision -> dtype of parameters and tensors created under init_module / init_tensor
INIT_DTYPE = {"32-true": F32, "bf16-mixed": F32, "bf16-true": BF16, "16-true": F16, "64-true": F64}
# precision -> dtype of a float32 layer applied to float32 data inside fabric.autocast()
AUTOCAST_MATMUL = {"32-true": F32, "bf16-mixed": BF16, "bf16-true": F32, "16-true": F32, "64-true": F32}


class DtypeRecorder(nn.Module):
    """Records the dtypes its forward pass sees."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 2)
        self.seen: dict[str, torch.dtype] = {}

    def forward(self, x, index):
        self.seen["input"] = x.dtype
        self.seen["index"] = index.dtype
        hidden = self.first(x)
        self.seen["activation"] = hidden.dtype
        return {"out": self.second(torch.relu(hidden)), "index": index}


def _run(fabric: Fabric) -> dict:
    torch.manual_seed(0)
    recorder = DtypeRecorder()
    model, optimizer = fabric.setup(recorder, torch.optim.SGD(recorder.parameters(), lr=0.5))
    before = {name: p.detach().clone() for name, p in recorder.named_parameters()}
    output = model(torch.randn(3, 4), torch.tensor([0, 2, 1]))
    fabric.backward(output["out"].float().pow(2).sum())
    grads = {p.grad.dtype for p in recorder.parameters()}
    optimizer.step()
    return {
        "params": {p.dtype for p in recorder.parameters()},
        "seen": dict(recorder.seen),
        "output": output,
        "grads": grads,
        "moved": all(not torch.equal(before[n], p) for n, p in recorder.named_parameters()),
        "params_after_step": {p.dtype for p in recorder.parameters()},
    }


def _check(result: dict, precision: str) -> None:
    params, input_dtype, activation, output, grads = EXPECTED[precision]
    assert result["params"] == {params}
    assert result["seen"]["input"] == input_dtype
    assert result["seen"]["activation"] == activation
    assert result["seen"]["index"] == torch.int64
    assert result["output"]["out"].dtype == output
    assert result["output"]["index"].dtype == torch.int64
    assert result["grads"] == {grads}
    assert result["moved"]
    assert result["params_after_step"] == {params}


@pytest.mark.parametrize("precision", list(EXPECTED))
def test_dtypes_of_parameters_activations_outputs_and_gradients(precision):
    default = torch.get_default_dtype()
    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    assert fabric.config.precision == precision
    _check(_run(fabric), precision)
    assert torch.get_default_dtype() == default


def test_16_mixed_on_cpu_becomes_bf16_mixed_with_a_warning():
    with pytest.warns(UserWarning, match="bf16-mixed"):
        fabric = Fabric(accelerator="cpu", devices=1, precision="16-mixed")
    assert fabric.config.precision == "bf16-mixed"
    _check(_run(fabric), "bf16-mixed")


@pytest.mark.parametrize("precision", list(INIT_DTYPE))
def test_init_module_init_tensor_and_autocast_follow_the_precision(precision):
    default = torch.get_default_dtype()
    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    with fabric.init_module():
        layer = nn.Linear(4, 4)
    with fabric.init_tensor():
        tensor = torch.randn(2)
    assert layer.weight.dtype == layer.bias.dtype == tensor.dtype == INIT_DTYPE[precision]
    assert torch.get_default_dtype() == default

    plain = nn.Linear(4, 4)
    with fabric.autocast():
        computed = plain(torch.randn(2, 4, dtype=default))
        created = torch.ones(2)
    assert computed.dtype == AUTOCAST_MATMUL[precision]
    assert created.dtype == INIT_DTYPE[precision]
    assert torch.get_default_dtype() == default


def test_init_module_restores_the_default_dtype_when_the_block_raises():
    default = torch.get_default_dtype()
    fabric = Fabric(accelerator="cpu", devices=1, precision="64-true")
    with pytest.raises(RuntimeError, match="in the block"):
        with fabric.init_module():
            assert torch.get_default_dtype() == F64
            raise RuntimeError("in the block")
    assert torch.get_default_dtype() == default


def test_ddp_applies_the_precision_on_every_rank():
    def run(fabric):
        result = _run(fabric)
        return {"rank": fabric.global_rank, "checks": fabric.all_gather(torch.tensor(_summary(result)))}

    result = Fabric(accelerator="cpu", devices=2, precision="bf16-true").launch(run)
    assert result["rank"] == 0
    expected = torch.tensor(_summary_of_expected("bf16-true"))
    assert torch.equal(result["checks"], torch.stack([expected, expected]))


def _dtype_code(dtype: torch.dtype) -> int:
    return [F32, BF16, F16, F64].index(dtype)


def _summary(result: dict) -> list[int]:
    (params,) = result["params"]
    (grads,) = result["grads"]
    return [
        _dtype_code(params),
        _dtype_code(result["seen"]["input"]),
        _dtype_code(result["seen"]["activation"]),
        _dtype_code(result["output"]["out"].dtype),
        _dtype_code(grads),
    ]


def _summary_of_expected(precision: str) -> list[int]:
    return [_dtype_code(dtype) for dtype in EXPECTED[precision]]


CUDA_ENTRY_POINTS = (
    "is_available", "device_count", "init", "_lazy_init", "current_device", "set_device", "get_device_properties",
    "get_device_capability", "is_bf16_supported", "synchronize", "mem_get_info", "memory_allocated",
)


@pytest.mark.parametrize("strategy", ["auto", "ddp", "fsdp", "single_device"])
def test_making_a_fabric_and_preparing_to_fork_never_touch_cuda(monkeypatch, strategy):
    from nbfabric import config
    from nbfabric.devices import GpuInfo, Hardware
    from nbfabric.launcher.fork_safety import check_fork_safe
    from nbfabric.launcher.launchers import select_launcher

    def refuse(*args, **kwargs):
        raise AssertionError("CUDA was touched in the process that forks the ranks")

    for name in CUDA_ENTRY_POINTS:
        monkeypatch.setattr(torch.cuda, name, refuse)
    monkeypatch.setattr(config, "detect_hardware", lambda: Hardware(cpu_count=8, gpus=(GpuInfo(0, "GPU", 1 << 34), GpuInfo(1, "GPU", 1 << 34)), mps=False))
    devices = 1 if strategy == "single_device" else 2
    for accelerator in ("cuda", "cpu"):
        for precision in ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true"):
            if accelerator == "cpu" and precision in ("16-true",):
                continue
            fabric = Fabric(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision)
            select_launcher(fabric.config, new_processes=True)
            fabric.strategy.preload()
            check_fork_safe()


def test_warnings_about_the_users_settings_point_at_the_users_line():
    with pytest.warns(UserWarning, match="'16-mixed' .* is meant for GPUs") as caught:
        fabric = Fabric(accelerator="cpu", precision="16-mixed")
    with pytest.warns(UserWarning, match="No seed found") as seeded, mock.patch.dict(os.environ):  # it sets PL_GLOBAL_SEED
        fabric.seed_everything()
    with pytest.warns(UserWarning, match="parameters on different devices") as moved, pytest.raises(NotImplementedError):
        fabric.setup(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to("meta")))
    assert [w.filename for w in (*caught, *seeded, *moved)] == [__file__] * 3
