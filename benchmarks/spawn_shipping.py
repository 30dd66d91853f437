"""In one real Jupyter kernel: a 2-rank `%%fabric` cell that reads a 400 MB notebook tensor, forked
against spawned (the tensor then goes through shared memory), contenders alternating; and a spawned
cell that reads nothing, the interpreters' start. Bar: spawned <= 2x forked + that start. Then,
once, the spawned cell with /dev/shm out of use, which sends the tensor through pipes.

    python benchmarks/spawn_shipping.py [--runs 5] [--mb 400] [--pipe-runs 1]
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
from pathlib import Path

from kernel_cell import alternating, kernel, run

SETUP = """
%load_ext nbfabric
import time, torch
from nbfabric.launcher import shared_tensors
from nbfabric.launcher.processes import wait_for_reaping
big = torch.randn({elements}, generator=torch.Generator().manual_seed(0))
exact = int(big.view(torch.int32).sum(dtype=torch.int64))  # a checksum of every bit

def timed(flags, cell):
    started = time.perf_counter()
    value = get_ipython().run_cell_magic("fabric", "--accelerator=cpu --devices=2 --no-widgets " + flags, cell)
    elapsed = (time.perf_counter() - started) * 1000
    assert wait_for_reaping(10)  # untimed: ranks may still be exiting
    return elapsed, value
"""

READS = "float(big.sum())"  # every page of the tensor, in each rank (same threads whether forked or spawned)
CHECKSUM = "int(big.view(torch.int32).sum(dtype=torch.int64))"
CONTENDERS = {
    "fork, reads the tensor": ("", READS),
    "spawn, reads the tensor": ("--start-method=spawn", READS),
    "spawn, reads nothing": ("--start-method=spawn", "0.0"),
}
PIPES = """
shared_tensors.SHM_DIR = "/nonexistent"  # no room: the tensor goes inside the pickle, through pipes
try:
    result = timed("--start-method=spawn", {reads!r})
finally:
    shared_tensors.SHM_DIR = "/dev/shm"
result
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mb", type=int, default=400)
    parser.add_argument("--pipe-runs", type=int, default=1)
    args = parser.parse_args()
    with kernel() as (_, client):
        run(client, SETUP.format(elements=args.mb * 2**20 // 4), timeout=300)
        exact = int(run(client, "exact"))
        _, spawned = ast.literal_eval(run(client, f"timed('--start-method=spawn', {CHECKSUM!r})", timeout=600))
        if spawned != exact:
            raise SystemExit(f"FAIL: a spawned rank's checksum of the tensor is {spawned}, the notebook's {exact}")
        sums = set()

        def cell(code: str) -> float:
            elapsed, value = ast.literal_eval(run(client, code, timeout=600))
            sums.add(value)
            if len(sums - {0.0}) > 1:
                raise SystemExit(f"FAIL: ranks read different sums: {sums}")
            return elapsed

        for flags, body in CONTENDERS.values():  # warm-up: first imports, first fork and spawn
            cell(f"timed({flags!r}, {body!r})")
        times = alternating(CONTENDERS, args.runs, lambda name: cell("timed({!r}, {!r})".format(*CONTENDERS[name])))
        pipes = [cell(PIPES.format(reads=READS)) for _ in range(args.pipe_runs)]
    print(f"2 CPU ranks, a {args.mb} MB float32 tensor in the notebook, {args.runs} runs each after one warm-up, alternating, one kernel")
    print(f"  {'cell':34} {'median ms':>10} {'min ms':>9} {'max ms':>9}")
    for name, values in times.items():
        print(f"  {name:34} {statistics.median(values):10.0f} {min(values):9.0f} {max(values):9.0f}")
    for value in pipes:
        print(f"  {'spawn, reads it, through pipes':34} {value:10.0f}   (once, /dev/shm out of use)")
    fork, spawn, start = (statistics.median(times[name]) for name in CONTENDERS)
    bar = 2 * fork + start
    verdict = "PASS" if spawn <= bar else "FAIL"
    print(f"  spawn reading it: {spawn:.0f} ms; bar 2 x fork + bare spawn = {bar:.0f} ms ({spawn / bar:.2f} of it): {verdict}")
    print(f"  spawn reading it - bare spawn: {spawn - start:.0f} ms; fork reading it: {fork:.0f} ms")
    out = Path(__file__).parent / "results" / "spawn_shipping.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({**times, "spawn through pipes": pipes}, indent=1))


if __name__ == "__main__":
    main()
