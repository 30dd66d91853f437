import dataclasses
import os
from types import SimpleNamespace

import pynvml
import pytest
import torch

from nbfabric import devices
from nbfabric.devices import GpuInfo, Hardware, cuda_initialized, detect_hardware

GiB = 1 << 30
NVML_GPUS = [("GPU-A", 80 * GiB), ("GPU-B", 40 * GiB), ("GPU-C", 24 * GiB), ("GPU-D", 16 * GiB)]


@pytest.fixture(autouse=True)
def fresh_detection():
    devices._detect.cache_clear()
    yield
    devices._detect.cache_clear()


class FakeNvml:
    """Stands in for the NVML library: GPUs by NVML index, or a failing nvmlInit when `gpus` is None."""

    def __init__(self, monkeypatch, gpus, failing_call=None):
        self.gpus = gpus
        self.open = 0
        self.failing_call = failing_call
        for name in ("nvmlInit", "nvmlShutdown", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetName",
                     "nvmlDeviceGetMemoryInfo"):
            monkeypatch.setattr(pynvml, name, getattr(self, name))

    def _maybe_fail(self, call):
        if call == self.failing_call:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)

    def nvmlInit(self):
        if self.gpus is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        self.open += 1

    def nvmlShutdown(self):
        self.open -= 1

    def nvmlDeviceGetHandleByIndex(self, index):
        if index >= len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def nvmlDeviceGetName(self, handle):
        self._maybe_fail("name")
        return self.gpus[handle][0]

    def nvmlDeviceGetMemoryInfo(self, handle):
        self._maybe_fail("memory")
        return SimpleNamespace(total=self.gpus[handle][1], free=0, used=0)


@pytest.fixture
def cuda_build(monkeypatch):
    """A CUDA build of torch whose NVML device count the test sets; every call that initialises CUDA fails."""

    def forbidden(*args, **kwargs):
        raise AssertionError("device detection must not initialise CUDA")

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    for name in ("init", "_lazy_init", "is_available", "device_count", "get_device_name",
                 "get_device_properties", "mem_get_info", "current_device"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", forbidden, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def set_count(count):
        monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: count)

    return set_count


def test_real_detection_leaves_cuda_uninitialised_and_counts_affinity():
    hardware = detect_hardware()
    assert not torch.cuda.is_initialized()
    assert not cuda_initialized()
    assert hardware.cpu_count == len(os.sched_getaffinity(0))
    assert hardware.mps == torch.backends.mps.is_available()
    assert [gpu.index for gpu in hardware.gpus] == list(range(hardware.cuda_count))


def test_cpu_build_reports_no_gpus_without_asking_nvml(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: pytest.fail("asked NVML on a CPU build"))
    assert detect_hardware().gpus == ()


@pytest.mark.parametrize(
    ("visible", "count", "expected"),
    [
        (None, 2, [("GPU-A", 80 * GiB), ("GPU-B", 40 * GiB)]),
        ("2,0", 2, [("GPU-C", 24 * GiB), ("GPU-A", 80 * GiB)]),
        (" 1, 3", 2, [("GPU-B", 40 * GiB), ("GPU-D", 16 * GiB)]),
        ("3", 1, [("GPU-D", 16 * GiB)]),
        ("GPU-8a7e3c1d,GPU-77f0", 2, [(None, None), (None, None)]),
        ("MIG-0e2b", 1, [(None, None)]),
    ],
)
def test_gpus_are_named_through_cuda_visible_devices(monkeypatch, cuda_build, visible, count, expected):
    cuda_build(count)
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    nvml = FakeNvml(monkeypatch, NVML_GPUS)
    hardware = detect_hardware()
    assert hardware.gpus == tuple(GpuInfo(i, name, memory) for i, (name, memory) in enumerate(expected))
    assert hardware.cuda_count == count
    assert nvml.open == 0
    assert not torch.cuda.is_initialized()


@pytest.mark.parametrize("failing_call", ["init", "name", "memory"])
def test_nvml_errors_leave_names_unknown(monkeypatch, cuda_build, failing_call):
    cuda_build(2)
    nvml = FakeNvml(monkeypatch, None if failing_call == "init" else NVML_GPUS, failing_call)
    assert detect_hardware().gpus == (GpuInfo(0, None, None), GpuInfo(1, None, None))
    assert nvml.open == 0


def test_nvml_count_failure_means_no_gpus(monkeypatch, cuda_build):
    cuda_build(-1)
    FakeNvml(monkeypatch, NVML_GPUS)
    assert detect_hardware().cuda_count == 0


def test_detection_is_cached_per_cuda_visible_devices(monkeypatch, cuda_build):
    calls = []
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: calls.append(1) or 2)
    FakeNvml(monkeypatch, NVML_GPUS)
    first = detect_hardware()
    assert detect_hardware() is first
    assert len(calls) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert detect_hardware().gpus[0].name == "GPU-B"
    assert len(calls) == 2


def test_cpu_count_is_the_affinity_not_the_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert detect_hardware().cpu_count == 3


def test_cpu_count_falls_back_to_os_cpu_count(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert detect_hardware().cpu_count == 7


@pytest.mark.parametrize(
    ("cuda_count", "mps", "expected"),
    [
        (0, False, ("cpu",)),
        (2, False, ("cuda", "cpu")),
        (0, True, ("mps", "cpu")),
        (1, True, ("cuda", "mps", "cpu")),
    ],
)
def test_accelerators_in_preference_order(cuda_count, mps, expected):
    gpus = tuple(GpuInfo(i, None, None) for i in range(cuda_count))
    hardware = Hardware(cpu_count=4, gpus=gpus, mps=mps)
    assert hardware.cuda_count == cuda_count
    assert hardware.accelerators() == expected


def test_cuda_initialized_reports_torch_state(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert cuda_initialized()


@pytest.mark.parametrize(
    ("value", "field"), [(GpuInfo(0, "GPU-A", GiB), "name"), (Hardware(4, (), False), "cpu_count")]
)
def test_results_are_frozen(value, field):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, field, None)
