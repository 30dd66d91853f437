"""Single-GPU bf16-mixed training: nbfabric against Lightning Fabric on the same model, alternating.

    pip install lightning   # only for this benchmark
    python benchmarks/gpu_training.py [--runs 15] [--steps 200]

Needs a CUDA GPU; the bar nbfabric holds itself to is <= 1.01x Lightning's median time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)]
    return torch.nn.Sequential(*layers)


def train(fabric, steps: int) -> float:
    """Time `steps` optimizer steps after 10 warm-up steps; the same code for both Fabrics."""
    model = make_model()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    x = torch.randn(64, 1024, device=fabric.device)
    for step in range(steps + 10):
        if step == 10:
            torch.cuda.synchronize()
            started = time.perf_counter()
        loss = F.mse_loss(model(x), x)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    from nbfabric.devices import detect_hardware

    if detect_hardware().cuda_count == 0:
        sys.exit("this benchmark needs a CUDA GPU; none was found")
    import lightning as L

    from nbfabric import Fabric

    contenders = {
        "nbfabric": lambda: Fabric(accelerator="cuda", devices=1, precision="bf16-mixed"),
        "Lightning": lambda: L.Fabric(accelerator="cuda", devices=1, precision="bf16-mixed"),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for run in range(args.runs + 1):
        for name, make in contenders.items():
            fabric = make()
            elapsed = fabric.launch(train, args.steps)
            if run:  # the first round warms up kernels and allocators
                times[name].append(elapsed)
    for name, values in times.items():
        print(f"{name:>10}: median {statistics.median(values):8.1f} ms for {args.steps} steps, max {max(values):8.1f} ms")
    ratio = statistics.median(times["nbfabric"]) / statistics.median(times["Lightning"])
    print(f"nbfabric / Lightning (median): {ratio:.3f} (bar: <= 1.01)")


if __name__ == "__main__":
    main()
