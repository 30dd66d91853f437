"""What showing a run costs the notebook: in one real Jupyter kernel, the same CPU-bound 2-rank
training cell (a metric logged every 50 ms, a line printed every 0.5 s) with the live dashboard
and with --no-widgets, alternating. Reports the kernel's own CPU time per second of run (the bar:
under 5 % of a core with the dashboard) and the cell's wall time (training slowdown).

    python benchmarks/dashboard_cost.py [--runs 3] [--steps 400]
"""

from __future__ import annotations

import argparse
import statistics
import textwrap
import time

import psutil
from jupyter_client.manager import start_new_kernel

CELL = """
import time, torch
torch.manual_seed(fabric.global_rank)
weights = torch.randn(256, 256)
last_line = time.monotonic()
for step in range({steps}):
    started = time.monotonic()
    while time.monotonic() - started < 0.05:  # 50 ms of work between two logged values
        weights = torch.tanh(weights @ weights / 256)
    fabric.log("loss", float(weights.abs().mean()), step=step)
    if time.monotonic() - last_line > 0.5:
        print(f"step {{step}}: {{float(weights.mean()):.4f}}")
        last_line = time.monotonic()
"""


def measure(manager, client, flags: str, steps: int) -> tuple[float, float]:
    """(wall seconds, kernel CPU seconds) of one cell."""
    kernel = psutil.Process(manager.provisioner.pid)
    before = kernel.cpu_times()
    code = f"%%fabric --accelerator=cpu --devices=2 --no-return {flags}\n" + textwrap.dedent(CELL.format(steps=steps))
    started = time.perf_counter()
    reply = client.execute_interactive(code, timeout=600, output_hook=lambda message: None)
    wall = time.perf_counter() - started
    assert reply["content"]["status"] == "ok", reply["content"]
    after = kernel.cpu_times()
    cpu = (after.user - before.user) + (after.system - before.system)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400, help="logged steps of 50 ms per run (default: 400, 20 s)")
    args = parser.parse_args()
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        client.execute_interactive("%load_ext nbfabric", timeout=60)
        contenders = {"dashboard": "--widgets", "--no-widgets": "--no-widgets"}
        results = {name: [] for name in contenders}
        for name, flags in contenders.items():  # warm-up
            measure(manager, client, flags, 20)
        for round_ in range(args.runs):
            order = list(contenders.items())
            for name, flags in order if round_ % 2 == 0 else reversed(order):
                results[name].append(measure(manager, client, flags, args.steps))
        print(f"{'view':<14}{'wall s (median)':>17}{'kernel CPU s':>14}{'kernel CPU / s of run':>23}")
        for name, runs in results.items():
            wall = statistics.median(w for w, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            print(f"{name:<14}{wall:>17.2f}{cpu:>14.2f}{cpu / wall:>22.1%}")
        ratio = statistics.median(w for w, _ in results["dashboard"]) / statistics.median(w for w, _ in results["--no-widgets"])
        share = statistics.median(c / w for w, c in results["dashboard"])
        print(f"wall time, dashboard / --no-widgets: {ratio:.3f}")
        print(f"kernel CPU with the dashboard: {share:.1%} of a core ({'meets' if share < 0.05 else 'misses'} the 5 % bar)")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


if __name__ == "__main__":
    main()
