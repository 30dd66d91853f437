"""What becoming a rank costs a process forked from a real Jupyter kernel (torch, Lightning and
Accelerate imported, so tqdm's notebook bars too): the CPU time and the memory pages copied by
`worker.become_rank`, as shipped against the same with the inherited objects it replaces freed
instead of kept (`inherited.keep` a no-op), alternating; and what the fork's own handlers (Python's
and the libraries') cost the child before any of nbfabric's code runs. Medians.

    python benchmarks/rank_start.py [--children 31]
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics

from kernel_cell import alternating, kernel, run

SETUP = """
%load_ext nbfabric
import os, json, resource, time, torch
import lightning
from accelerate import notebook_launcher
from unittest import mock
from nbfabric.launcher import _rank_specs, inherited, worker
from nbfabric.launcher.inherited import find_inherited
from nbfabric.launcher.processes import wait_for_reaping

get_ipython().run_cell_magic('fabric', '--accelerator=cpu --devices=2 --no-return', 'pass')
wait_for_reaping(10)

def _spent():
    return time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID) / 1000, resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def _become(spec, fds, found):
    worker.become_rank(spec, *fds, inherited=found)

def _become_freeing(spec, fds, found):
    drop = lambda *objects: None
    with mock.patch.object(inherited, "keep", drop), mock.patch.object(worker, "keep", drop):
        worker.become_rank(spec, *fds, inherited=found)

def child(name):
    # a child that becomes a rank ("kept" as shipped, or "freed") and reports, as JSON, the
    # (CPU us, pages copied) of its birth and of becoming the rank
    step = _become if name == "kept" else _become_freeing
    spec = _rank_specs(1, 1, 0, "127.0.0.1", 29999, None)[0]
    found = find_inherited()
    ends = [os.pipe() for _ in range(4)]
    report = os.pipe()
    pid = os.fork()
    if pid == 0:
        born = _spent()
        step(spec, [w for _, w in ends], found)
        done = _spent()
        os.write(report[1], json.dumps([born, [done[0] - born[0], done[1] - born[1]]]).encode())
        os._exit(0)
    for fd in [report[1], *(fd for pair in ends for fd in pair)]:
        os.close(fd)
    answer = os.read(report[0], 4096).decode()
    os.close(report[0])
    os.waitpid(pid, 0)
    return answer
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--children", type=int, default=31)
    args = parser.parse_args()
    with kernel() as (_, client):
        run(client, SETUP, timeout=300)
        results = alternating(("kept", "freed"), args.children, lambda name: json.loads(ast.literal_eval(run(client, f"child({name!r})"))))

    print(f"a child forked from a kernel, {args.children} children each way, alternating; medians")
    births = [born for runs in results.values() for born, _ in runs]
    print(f"  the fork's handlers, before nbfabric's code: {statistics.median(b[0] for b in births):7.0f} us CPU, {statistics.median(b[1] for b in births):5.0f} pages")
    cpu = {}
    for name, label in (("kept", "become_rank, replaced objects kept (as shipped)"), ("freed", "become_rank, replaced objects freed")):
        steps = [step for _, step in results[name]]
        cpu[name] = statistics.median(s[0] for s in steps)
        print(f"  {label:48} {cpu[name]:7.0f} us CPU, {statistics.median(s[1] for s in steps):5.0f} pages")
    print(f"  kept / freed (CPU): {cpu['kept'] / cpu['freed']:.2f}")


if __name__ == "__main__":
    main()
