"""What hardware exists, found without initialising CUDA."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import pynvml
import torch


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA GPU; `index` is its torch ordinal (`cuda:index`) under the current CUDA_VISIBLE_DEVICES."""

    index: int
    name: str | None
    memory_bytes: int | None


@dataclass(frozen=True)
class Hardware:
    """The CPUs, CUDA GPUs and MPS device available to this process."""

    cpu_count: int
    gpus: tuple[GpuInfo, ...]
    mps: bool

    @property
    def cuda_count(self) -> int:
        return len(self.gpus)

    def accelerators(self) -> tuple[str, ...]:
        """The accelerators present, most preferred first; "cpu" is always last."""
        present = {"cuda": self.cuda_count > 0, "mps": self.mps, "cpu": True}
        return tuple(name for name, available in present.items() if available)


def detect_hardware() -> Hardware:
    """Detect the hardware once per value of CUDA_VISIBLE_DEVICES; CUDA stays uninitialised."""
    return _detect(os.environ.get("CUDA_VISIBLE_DEVICES"))


def cuda_initialized() -> bool:
    """Whether CUDA was already initialised in this process (which makes forking ranks unsafe)."""
    return torch.cuda.is_initialized()


@functools.cache
def _detect(visible_devices: str | None) -> Hardware:
    count = _cuda_count()
    details = _nvml_details(_nvml_indices(visible_devices, count))
    gpus = tuple(GpuInfo(index, name, memory) for index, (name, memory) in enumerate(details))
    return Hardware(cpu_count=_cpu_count(), gpus=gpus, mps=torch.backends.mps.is_available())


def _cuda_count() -> int:
    if torch.version.cuda is None:
        return 0
    return max(torch.cuda._device_count_nvml(), 0)


def _nvml_indices(visible_devices: str | None, count: int) -> list[int | None]:
    """The NVML index of each visible GPU, or None where CUDA_VISIBLE_DEVICES is not a plain list of integers."""
    if visible_devices is None:
        return list(range(count))
    entries = [entry.strip() for entry in visible_devices.split(",")]
    if not all(entry.isascii() and entry.isdigit() for entry in entries):
        return [None] * count
    ordinals = [int(entry) for entry in entries]
    return [ordinals[i] if i < len(ordinals) else None for i in range(count)]


def _nvml_details(indices: list[int | None]) -> list[tuple[str | None, int | None]]:
    unknown = [(None, None)] * len(indices)
    if all(index is None for index in indices):
        return unknown
    try:
        pynvml.nvmlInit()
        try:
            return [(None, None) if index is None else _describe(index) for index in indices]
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return unknown


def _describe(index: int) -> tuple[str, int]:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    return pynvml.nvmlDeviceGetName(handle), int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe_hardware(hardware: Hardware | None = None) -> str:
    """One line: CPU cores, each CUDA GPU with its name and memory, Apple MPS."""
    hardware = detect_hardware() if hardware is None else hardware
    gpus = ", ".join(f"cuda:{gpu.index} {gpu_name(gpu)}" for gpu in hardware.gpus)
    parts = [f"{hardware.cpu_count} CPU cores", gpus or "no CUDA GPU"]
    if hardware.mps:
        parts.append("Apple MPS")
    return "; ".join(parts)


def gpu_name(gpu: GpuInfo) -> str:
    memory = f" ({gpu.memory_bytes / 1024**3:.0f} GiB)" if gpu.memory_bytes else ""
    return f"{gpu.name or 'GPU'}{memory}"


class Accelerator:
    """A run's kind of device, as `fabric.accelerator` gives it: `name()` is "cpu", "cuda" or "mps", as in Lightning."""

    def __init__(self, name: str):
        self._name = name

    def name(self) -> str:
        return self._name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Accelerator) and other._name == self._name

    def __hash__(self) -> int:
        return hash(self._name)

    def __repr__(self) -> str:
        return f"Accelerator({self._name!r})"

    def __str__(self) -> str:
        return self._name
