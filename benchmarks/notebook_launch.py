"""In one real Jupyter kernel: an empty `%%fabric` cell against Lightning's `ddp_notebook` launch
and Accelerate's `notebook_launcher`, 2 CPU ranks each, contenders alternating; and two bare forks
of the kernel, the part of each that no launcher can save.

    pip install accelerate lightning   # only for this benchmark
    python benchmarks/notebook_launch.py [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from kernel_cell import alternating, kernel, run

SETUP = """
%load_ext nbfabric
import os, time, torch
import lightning as L
from accelerate import notebook_launcher
from nbfabric.launcher.processes import wait_for_reaping

def nothing(*args):
    pass

def two_bare_forks():
    # the floor every launcher here stands on: two forks of this kernel, back to back, each child
    # leaving at once; waited for (untimed) afterwards
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        pids.append(pid)
    return pids

def timed(run):
    started = time.perf_counter()
    made = run()
    elapsed = (time.perf_counter() - started) * 1000
    for pid in made if isinstance(made, list) else ():
        os.waitpid(pid, 0)
    # untimed: nbfabric's ranks may still be exiting (it returns before their teardown); the next
    # contender starts on an idle machine
    assert wait_for_reaping(10)
    return elapsed
"""

LIGHTNING_BAR = 0.5  # the %%fabric median at most this times Lightning's

CONTENDERS = {
    "nbfabric %%fabric": "timed(lambda: get_ipython().run_cell_magic('fabric', '--accelerator=cpu --devices=2 --no-return', 'pass'))",
    "nbfabric %%fabric --no-widgets": "timed(lambda: get_ipython().run_cell_magic('fabric', '--accelerator=cpu --devices=2 --no-return --no-widgets', 'pass'))",
    "Lightning ddp_notebook": "timed(lambda: L.Fabric(accelerator='cpu', devices=2, strategy='ddp_notebook').launch(nothing))",
    "Accelerate notebook_launcher": "timed(lambda: notebook_launcher(nothing, num_processes=2))",
    "two bare forks of the kernel": "timed(two_bare_forks)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with kernel() as (_, client):
        run(client, SETUP, timeout=300)
        for code in CONTENDERS.values():  # warm-up: first imports, first fork
            run(client, code, timeout=300)
        times = alternating(CONTENDERS, args.runs, lambda name: float(run(client, CONTENDERS[name], timeout=300)))
    print(f"2 CPU ranks, {args.runs} runs each after one warm-up, order reversed every other round, one kernel")
    print(f"  {'contender':34} {'median ms':>10} {'max ms':>9} {'max/med':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:34} {median:10.1f} {max(values):9.1f} {max(values) / median:8.2f}")
    ours, lightning = statistics.median(times["nbfabric %%fabric"]), statistics.median(times["Lightning ddp_notebook"])
    spread = max(times["nbfabric %%fabric"]) / ours
    print(f"  nbfabric / Lightning (median): {ours / lightning:.2f}; bar <= {LIGHTNING_BAR}: {'PASS' if ours / lightning <= LIGHTNING_BAR else 'FAIL'}")
    q1, paired, q3 = statistics.quantiles([a / b for a, b in zip(times["nbfabric %%fabric"], times["Lightning ddp_notebook"])], n=4)
    print(f"  nbfabric / Lightning, per-round ratio (each round ran both): median {paired:.2f}, quartiles {q1:.2f}-{q3:.2f}")
    print(f"  nbfabric max / median: {spread:.2f}; bar <= 2.5: {'PASS' if spread <= 2.5 else 'FAIL'}")
    forks = statistics.median(times["two bare forks of the kernel"])
    print(f"  beyond two bare forks ({forks:.1f} ms): nbfabric {ours - forks:.1f} ms, Lightning {lightning - forks:.1f} ms")
    out = Path(__file__).parent / "results" / "notebook_launch.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
