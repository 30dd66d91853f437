"""What each rank uses, seen from outside it: resident memory and CPU (psutil; the rank with its
child processes, such as DataLoader workers) and, where there are GPUs, the GPU memory it holds and
its GPU's utilisation (NVML). Sampled by a run's loop about once a second; the ranks do nothing."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import pynvml

SAMPLE_EVERY = 1.0  # seconds between two samples


@dataclass(frozen=True)
class Usage:
    """One rank at one moment."""

    rss: int  # bytes resident
    cpu: float  # percent of one core since the previous sample
    gpu_memory: int | None = None  # bytes of GPU memory its processes hold (None: no GPU seen)
    gpu_utilization: int | None = None  # percent, of the GPU it uses

    def text(self) -> str:
        """"1.2 GB, 97% CPU, GPU 3.1 GB (88%)"."""
        shown = f"{size(self.rss)}, {self.cpu:.0f}% CPU"
        if self.gpu_memory is not None:
            shown += f", GPU {size(self.gpu_memory)}" + (f" ({self.gpu_utilization}%)" if self.gpu_utilization is not None else "")
        return shown


def size(count: int) -> str:
    """Bytes as people read them: "512 MB", "3.1 GB"."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if count >= scale:
            value = count / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{count} B"


class UsageMeter:
    """Samples the ranks with these pids (rank -> pid); keeps each rank's last sample."""

    def __init__(self, pids: dict[int, int]):
        self._ranks: dict[int, psutil.Process] = {}
        for rank, pid in pids.items():
            try:
                self._ranks[rank] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                pass
        self._children: dict[int, psutil.Process] = {}  # pid -> process, so that CPU times carry on
        self.last: dict[int, Usage] = {}
        self._gpus = _Gpus()

    def sample(self) -> dict[int, Usage]:
        """Each living rank's usage now."""
        gpu = self._gpus.by_pid()
        taken = {}
        for rank, process in self._ranks.items():
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue  # it has ended
                family = [process, *(self._child(child) for child in process.children())]
                rss = cpu = 0.0
                for member in family:
                    rss += member.memory_info().rss
                    cpu += member.cpu_percent(None)
            except psutil.Error:
                continue  # it has ended
            if not rss:
                continue  # its memory is being torn down (killed, ending): the last sample stands
            held = [gpu[member.pid] for member in family if member.pid in gpu]
            memory = sum(used for used, _ in held) if held else None
            utilization = max(percent for _, percent in held) if held else None
            taken[rank] = Usage(int(rss), cpu, memory, utilization)
        self.last.update(taken)
        return taken

    def close(self) -> None:
        self._gpus.close()

    def _child(self, child: psutil.Process) -> psutil.Process:
        return self._children.setdefault(child.pid, child)


def highest(before: Usage | None, now: Usage) -> Usage:
    """Each figure's highest of the two."""
    if before is None:
        return now
    return Usage(max(before.rss, now.rss), max(before.cpu, now.cpu), _max(before.gpu_memory, now.gpu_memory), _max(before.gpu_utilization, now.gpu_utilization))


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


class _Gpus:
    """NVML, where a GPU is: the memory each process holds and its device's utilisation."""

    def __init__(self):
        try:
            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError:
            self._handles = None

    def by_pid(self) -> dict[int, tuple[int, int | None]]:
        """pid -> (bytes of GPU memory held, its device's utilisation in percent)."""
        found: dict[int, tuple[int, int | None]] = {}
        for handle in self._handles or ():
            try:
                processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                utilization = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                continue
            for process in processes:
                used, _ = found.get(process.pid, (0, None))
                found[process.pid] = (used + int(process.usedGpuMemory or 0), utilization)
        return found

    def close(self) -> None:
        if self._handles is not None:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass
