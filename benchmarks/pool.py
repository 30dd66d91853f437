"""A warm rank pool against fork-per-cell, in one real Jupyter kernel: an empty 2-rank `%%fabric`
cell and a short training cell, contenders alternating; an empty `%%fabric` cell on the pool
against ipyparallel's own `%%px` cell on the same two engines (bar: at most 1.5x); then the time to
start a pool of 2 local engines, and of 2 engines on two Slurm nodes where Slurm runs.

    python benchmarks/pool.py [--runs 10] [--starts 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

from kernel_cell import kernel, run

SETUP = """
%load_ext nbfabric
%fabric --accelerator=cpu --devices=2 --no-widgets
import time, torch
from nbfabric.launcher.processes import wait_for_reaping
from nbfabric.pool import RankPool
pool = RankPool(devices=2)
in_use = get_ipython().magics_manager.registry["FabricMagics"].pool
data = torch.randn(2048, 32, generator=torch.Generator().manual_seed(0))
target = data.sum(dim=1, keepdim=True)

def timed(cell, on_pool):
    in_use.use(pool if on_pool else None)
    started = time.perf_counter()
    get_ipython().run_cell_magic("fabric", "--no-return", cell)
    elapsed = (time.perf_counter() - started) * 1000
    in_use.use(None)
    assert wait_for_reaping(10)  # untimed: forked ranks may still be exiting
    return elapsed

pool.client[[place.engine for place in pool.ranks]].activate()  # ipyparallel's %%px on the pool's engines

def timed_px(cell):
    started = time.perf_counter()
    get_ipython().run_cell_magic("px", "--block", cell)
    return (time.perf_counter() - started) * 1000
"""

TRAINING = """
model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))
model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.01))
shard = slice(fabric.global_rank, None, fabric.world_size)
for step in range(100):
    loss = torch.nn.functional.mse_loss(model(data[shard]), target[shard])
    optimizer.zero_grad()
    fabric.backward(loss)
    optimizer.step()
"""

CELLS = {"empty 2-rank cell": "pass", "training cell (100 DDP steps)": TRAINING}


def cells_side_by_side(runs: int) -> tuple[list[tuple[str, float, float]], tuple[float, float]]:
    """Each cell on the pool and forked (medians, ms), and the empty cell on the pool against %%px."""
    rows = []
    with kernel("--HistoryManager.enabled=False") as (_, client):
        run(client, SETUP)
        against_px: dict[str, list[float]] = {"pool": [], "px": []}
        for name in ("pool", "px"):  # warm-up, untimed
            run(client, "timed('pass', True)" if name == "pool" else "timed_px('pass')")
        for round_ in range(runs):
            for name in ("pool", "px") if round_ % 2 == 0 else ("px", "pool"):
                against_px[name].append(float(run(client, "timed('pass', True)" if name == "pool" else "timed_px('pass')")))
        for name, cell in CELLS.items():
            times = {True: [], False: []}
            for on_pool in (True, False):  # warm-up, untimed
                run(client, f"timed({cell!r}, {on_pool})")
            for round_ in range(runs):
                order = (True, False) if round_ % 2 == 0 else (False, True)
                for on_pool in order:
                    times[on_pool].append(float(run(client, f"timed({cell!r}, {on_pool})")))
            rows.append((name, statistics.median(times[True]), statistics.median(times[False])))
        run(client, "pool.stop()")
    return rows, (statistics.median(against_px["pool"]), statistics.median(against_px["px"]))


def start_times(starts: int, engines: str) -> list[float]:
    from nbfabric.pool import RankPool

    options = {"devices": 2} if engines == "local" else {"devices": 1, "num_nodes": 2, "engines": "slurm", "controller_ip": "127.0.0.1"}
    times = []
    for _ in range(starts):
        started = time.perf_counter()
        pool = RankPool(**options)
        times.append(time.perf_counter() - started)
        pool.stop()
    return times


def slurm_nodes() -> int:
    if shutil.which("sinfo") is None:
        return 0
    listed = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True)
    return len(set(listed.stdout.split())) if listed.returncode == 0 else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per contender and cell")
    parser.add_argument("--starts", type=int, default=2, help="pool starts timed per engine kind (0: none)")
    args = parser.parse_args()

    print(f"| cell ({args.runs} runs, median) | warm pool ms | fork per cell ms | pool / fork |")
    print("| --- | ---: | ---: | ---: |")
    rows, (pool_ms, px_ms) = cells_side_by_side(args.runs)
    for name, on_pool_ms, fork_ms in rows:
        print(f"| {name} | {on_pool_ms:.1f} | {fork_ms:.1f} | {on_pool_ms / fork_ms:.2f} |")
    print()
    print(f"| empty cell on the pool's 2 engines ({args.runs} runs, median) | %%fabric ms | ipyparallel %%px ms | ratio |")
    print("| --- | ---: | ---: | ---: |")
    verdict = "PASS" if pool_ms <= 1.5 * px_ms else "FAIL"
    print(f"| warm pool | {pool_ms:.1f} | {px_ms:.1f} | {pool_ms / px_ms:.2f} (bar <= 1.5: {verdict}) |")
    if args.starts < 1:
        return
    print()
    print(f"| start a pool of 2 ranks ({args.starts} starts) | median s | max s |")
    print("| --- | ---: | ---: |")
    kinds = ["local"] + (["slurm"] if slurm_nodes() >= 2 else [])
    for kind in kinds:
        times = start_times(args.starts, kind)
        where = "local engines" if kind == "local" else "Slurm, 2 nodes (sbatch + srun)"
        print(f"| {where} | {statistics.median(times):.1f} | {max(times):.1f} |")
    if kinds == ["local"]:
        print("(no Slurm cluster of two nodes here: the Slurm start was not measured)", file=sys.stderr)


if __name__ == "__main__":
    main()
