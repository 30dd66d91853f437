import dataclasses
import re
import warnings

import pytest

import nbfabric.config
from nbfabric.config import PRECISIONS, RunConfig
from nbfabric.devices import GpuInfo, Hardware


def machine(gpus=0, mps=False, cpus=4):
    return Hardware(cpu_count=cpus, gpus=tuple(GpuInfo(i, "H100", 80 << 30) for i in range(gpus)), mps=mps)


CPU = machine()
GPU2 = machine(gpus=2)
GPU4 = machine(gpus=4)
MPS = machine(mps=True)
PRECISION_CHOICES = re.escape(
    "choose one of 32-true, 16-mixed, bf16-mixed, bf16-true, 16-true, 64-true (aliases: 32, 16, bf16, 64)"
)


def resolve(hardware, **settings):
    return RunConfig.resolve(hardware=hardware, **settings)


@pytest.mark.parametrize(
    ("value", "hardware", "expected"),
    [
        ("auto", CPU, "cpu"),
        ("auto", GPU2, "cuda"),
        ("auto", MPS, "mps"),
        ("auto", machine(gpus=1, mps=True), "cuda"),
        ("gpu", GPU2, "cuda"),
        ("gpu", MPS, "mps"),
        (" CUDA ", GPU2, "cuda"),
        ("Cpu", GPU2, "cpu"),
        ("mps", MPS, "mps"),
    ],
)
def test_accelerator_resolution(value, hardware, expected):
    assert resolve(hardware, accelerator=value).accelerator == expected


@pytest.mark.parametrize(
    ("value", "hardware", "match"),
    [
        ("cuda", CPU, "needs a CUDA GPU, but none is visible.*accelerator='cpu' works"),
        ("mps", GPU2, "needs an Apple MPS device, but none was found.*accelerator='cpu' works"),
        ("gpu", CPU, "no GPU was found; accelerator='cpu' works"),
        ("tpu", GPU2, "accelerator='tpu' is not valid; choose one of auto, cpu, cuda, gpu, mps"),
        (None, GPU2, "accelerator=None is not valid; choose one of auto, cpu, cuda, gpu, mps"),
    ],
)
def test_accelerator_errors(value, hardware, match):
    with pytest.raises(ValueError, match=match):
        resolve(hardware, accelerator=value)


@pytest.mark.parametrize(
    ("accelerator", "devices", "hardware", "expected"),
    [
        ("cpu", "auto", CPU, (0,)),
        ("cpu", 3, CPU, (0, 1, 2)),
        ("cpu", " 3 ", CPU, (0, 1, 2)),
        ("cpu", 8, CPU, tuple(range(8))),
        ("cpu", -1, CPU, (0, 1, 2, 3)),
        ("cpu", "-1", machine(cpus=2), (0, 1)),
        ("cuda", "auto", GPU4, (0, 1, 2, 3)),
        ("cuda", 2, GPU4, (0, 1)),
        ("cuda", "2", GPU4, (0, 1)),
        ("cuda", -1, GPU2, (0, 1)),
        ("cuda", [1, 3], GPU4, (1, 3)),
        ("cuda", (3, 0), GPU4, (3, 0)),
        ("cuda", "0,2", GPU4, (0, 2)),
        ("cuda", "2,", GPU4, (2,)),
        ("cuda", " 1 , 2 ", GPU4, (1, 2)),
        ("mps", "auto", MPS, (0,)),
        ("mps", 1, MPS, (0,)),
        ("mps", -1, MPS, (0,)),
        ("mps", [0], MPS, (0,)),
    ],
)
def test_devices_resolution(accelerator, devices, hardware, expected):
    config = resolve(hardware, accelerator=accelerator, devices=devices)
    assert config.device_ids == expected
    assert config.num_processes == len(expected)


@pytest.mark.parametrize("devices", [0, -2, "0", True, 1.5, 2.0, "two", "", ",", [], ["0"], [-1], "0,,1", "-1,", None])
def test_invalid_devices(devices):
    with pytest.raises(ValueError, match=re.escape(f"devices={devices!r} is not valid; pass a number of devices")):
        resolve(GPU4, accelerator="cuda", devices=devices)


@pytest.mark.parametrize(
    ("accelerator", "devices", "hardware", "match"),
    [
        ("cpu", [0, 1], GPU2, r"devices=\[0, 1\] lists GPU indices, but on CPU devices is a number of processes; "
                              r"pass devices=2"),
        ("cpu", "0,", CPU, "on CPU devices is a number of processes; pass devices=1"),
        ("cuda", 5, GPU4, "devices=5 asks for 5 devices, but this machine has 4 CUDA GPU.*devices=-1"),
        ("cuda", [0, 4], GPU4, r"names device 4, but this machine has 4 CUDA GPU\(s\) \(indices 0, 1, 2, 3\)"),
        ("cuda", "1,1", GPU4, "names device 1 twice"),
        ("mps", 2, MPS, "asks for 2 devices, but this machine has 1 MPS device"),
        ("mps", [1], MPS, "names device 1, but this machine has 1 MPS device"),
    ],
)
def test_devices_that_do_not_fit_the_hardware(accelerator, devices, hardware, match):
    with pytest.raises(ValueError, match=match):
        resolve(hardware, accelerator=accelerator, devices=devices)


@pytest.mark.parametrize(
    ("settings", "strategy", "start_method"),
    [
        ({}, "single_device", "fork"),
        ({"devices": 2}, "ddp", "fork"),
        ({"num_nodes": 2}, "ddp", "fork"),
        ({"strategy": "DDP"}, "ddp", "fork"),
        ({"strategy": "ddp_notebook", "devices": 2}, "ddp", "fork"),
        ({"strategy": "ddp_fork", "devices": 2}, "ddp", "fork"),
        ({"strategy": "ddp_spawn", "devices": 2}, "ddp", "spawn"),
        ({"strategy": "ddp_spawn", "devices": 2, "start_method": "spawn"}, "ddp", "spawn"),
        ({"strategy": "ddp", "devices": 2, "start_method": "spawn"}, "ddp", "spawn"),
        ({"strategy": "single_device", "start_method": " Spawn"}, "single_device", "spawn"),
    ],
)
def test_strategy_and_start_method_resolution(settings, strategy, start_method):
    config = resolve(CPU, **settings)
    assert (config.strategy, config.start_method) == (strategy, start_method)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"strategy": "horovod"}, "strategy='horovod' is not valid; choose one of auto, ddp, ddp_notebook, "
                                  "ddp_fork, ddp_spawn, ddp_find_unused_parameters_true, fsdp, deepspeed, "
                                  "deepspeed_stage_1, deepspeed_stage_2, deepspeed_stage_2_offload, deepspeed_stage_3, "
                                  "deepspeed_stage_3_offload, single_device"),
        ({"strategy": "dp"}, "strategy='dp' .* is not offered; use 'ddp'"),
        ({"strategy": "single_device", "devices": 2}, r"runs one process, but 2 device\(s\) on 1 node\(s\) make 2"),
        ({"strategy": "single_device", "num_nodes": 3}, r"1 device\(s\) on 3 node\(s\) make 3"),
        ({"strategy": "ddp_notebook", "start_method": "spawn"}, "conflicts with start_method='spawn'"),
        ({"strategy": "ddp_spawn", "devices": 2, "start_method": "fork"}, "'ddp_spawn' starts ranks with spawn, which conflicts with start_method='fork'"),
        ({"start_method": "forkserver"}, "start_method='forkserver' is not valid; choose one of fork, spawn"),
    ],
)
def test_strategy_and_start_method_errors(settings, match):
    with pytest.raises(ValueError, match=match):
        resolve(CPU, **settings)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("32", "32-true"),
        (32, "32-true"),
        ("16", "16-mixed"),
        (16, "16-mixed"),
        ("bf16", "bf16-mixed"),
        ("64", "64-true"),
        (64, "64-true"),
        ("BF16-Mixed", "bf16-mixed"),
        (" 16-true ", "16-true"),
        *[(precision, precision) for precision in PRECISIONS],
    ],
)
def test_precision_aliases(value, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve(GPU2, precision=value).precision == expected


@pytest.mark.parametrize("value", ["17", 17, 16.0, True, None, "fp16", "transformer-engine"])
def test_invalid_precision(value):
    with pytest.raises(ValueError, match=re.escape(f"precision={value!r} is not valid; ") + PRECISION_CHOICES):
        resolve(GPU2, precision=value)


@pytest.mark.parametrize("value", ["16-mixed", 16, "16"])
def test_fp16_mixed_on_cpu_becomes_bf16_with_a_warning(value):
    with pytest.warns(UserWarning, match="on CPU this run uses 'bf16-mixed'"):
        assert resolve(CPU, precision=value).precision == "bf16-mixed"


def test_mps_has_no_float64():
    with pytest.raises(ValueError, match="not available on MPS.*use '32-true'"):
        resolve(MPS, precision="64")


@pytest.mark.parametrize(("value", "expected"), [(2, 2), ("3", 3), (" 1 ", 1)])
def test_num_nodes(value, expected):
    assert resolve(CPU, num_nodes=value).num_nodes == expected


@pytest.mark.parametrize("value", [0, "0", -1, True, 1.5, "x", None])
def test_invalid_num_nodes(value):
    with pytest.raises(ValueError, match=re.escape(f"num_nodes={value!r} is not valid; pass a whole number")):
        resolve(CPU, num_nodes=value)


@pytest.mark.parametrize(
    ("device_ids", "num_nodes", "world_size", "distributed"),
    [((0,), 1, 1, False), ((0, 1), 1, 2, True), ((0,), 2, 2, True), ((0, 1, 2), 2, 6, True)],
)
def test_sizes(device_ids, num_nodes, world_size, distributed):
    config = RunConfig("cpu", device_ids, "ddp", "32-true", num_nodes=num_nodes)
    assert (config.num_processes, config.world_size, config.distributed) == (len(device_ids), world_size, distributed)


def test_default_hardware_comes_from_detection(monkeypatch):
    monkeypatch.setattr(nbfabric.config, "detect_hardware", lambda: MPS)
    assert RunConfig.resolve().accelerator == "mps"


VALID = {"accelerator": "cuda", "device_ids": (0, 1), "strategy": "ddp", "precision": "bf16-mixed"}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"accelerator": "gpu"}, "accelerator='gpu' is not a resolved accelerator; choose one of cpu, cuda, mps"),
        ({"device_ids": ()}, "non-empty tuple of distinct device indices"),
        ({"device_ids": [0, 1]}, "non-empty tuple of distinct device indices"),
        ({"device_ids": (0, 0)}, "non-empty tuple of distinct device indices"),
        ({"device_ids": (-1,)}, "non-empty tuple of distinct device indices"),
        ({"accelerator": "cpu", "device_ids": (1, 2)}, r"ranks 0..n-1; pass \(0, 1\)"),
        ({"accelerator": "mps", "device_ids": (1,), "strategy": "single_device"}, r"use device_ids=\(0,\)"),
        ({"accelerator": "mps", "device_ids": (0,), "num_nodes": 2}, "num_nodes=1"),
        ({"strategy": "auto"}, "strategy='auto' is not a resolved strategy; choose one of single_device, ddp, ddp_find_unused_parameters_true, fsdp"),
        ({"strategy": "single_device"}, r"runs one process, but 2 device\(s\)"),
        ({"precision": "bf16"}, "precision='bf16' is not a canonical precision; choose one of 32-true"),
        ({"accelerator": "cpu", "precision": "16-mixed"}, "not available on CPU; use 'bf16-mixed'"),
        ({"num_nodes": 0}, "num_nodes=0 is not valid"),
        ({"num_nodes": "2"}, "num_nodes='2' is not valid"),
        ({"start_method": "forkserver"}, "start_method='forkserver' is not valid; choose one of fork, spawn"),
    ],
)
def test_an_invalid_config_cannot_be_built(changes, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(**{**VALID, **changes})
    with pytest.raises(ValueError, match=match):
        RunConfig(**VALID).replace(**changes)


def test_replace_returns_a_validated_copy():
    config = RunConfig(**VALID)
    assert config.replace(precision="16-mixed", device_ids=(1,)) == RunConfig("cuda", (1,), "ddp", "16-mixed")
    assert config == RunConfig(**VALID)


def test_config_is_frozen_and_hashable():
    config = RunConfig(**VALID)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.precision = "32-true"
    assert {config: 1}[RunConfig(**VALID)] == 1


@pytest.mark.parametrize(
    ("config", "flags"),
    [
        (RunConfig("cpu", (0, 1), "ddp", "bf16-mixed"),
         "--accelerator=cpu --devices=2 --strategy=ddp --precision=bf16-mixed"),
        (RunConfig("cuda", (0,), "single_device", "32-true"),
         "--accelerator=cuda --devices=1 --strategy=single_device --precision=32-true"),
        (RunConfig("cuda", (2,), "single_device", "16-mixed"),
         "--accelerator=cuda --devices=2, --strategy=single_device --precision=16-mixed"),
        (RunConfig("cuda", (3, 1), "ddp", "bf16-true", num_nodes=2, start_method="spawn"),
         "--accelerator=cuda --devices=3,1 --strategy=ddp --precision=bf16-true --num-nodes=2 --start-method=spawn"),
        (RunConfig("mps", (0,), "ddp", "16-true"), "--accelerator=mps --devices=1 --strategy=ddp --precision=16-true"),
    ],
)
def test_as_flags_round_trip(config, flags):
    assert config.as_flags() == flags
    settings = dict(flag.removeprefix("--").split("=") for flag in flags.split())
    settings = {name.replace("-", "_"): value for name, value in settings.items()}
    assert RunConfig.resolve(**settings, hardware=machine(gpus=4, mps=True)) == config
