"""What being able to ask a rank where it is costs a run that never asks: an empty 2-rank
`Fabric.launch` as shipped (each rank registers its stack dump, the launcher makes a stack file per
rank) against the same launch with both made no-ops, alternating in one process; medians and ratio.
A second pair does the same with the once-a-second usage measurement on a 2-second run.

    python benchmarks/where_cost.py [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager
from unittest import mock

from nbfabric import Fabric
from nbfabric.launcher import processes, stacks, worker
from nbfabric.launcher.processes import wait_for_reaping


class _NoFile:
    """A stack file that is no file: what a launch without the where machinery would hold."""

    def __init__(self):
        self.fd = os.open(os.devnull, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)


@contextmanager
def without_where():
    with mock.patch.object(processes, "StackFile", _NoFile), mock.patch.object(worker.stacks, "listen", lambda fd: None):
        yield


@contextmanager
def without_usage():
    with mock.patch("nbfabric.launcher.run_loop.UsageMeter.sample", lambda self: {}):
        yield


def launch_ms(seconds: float) -> float:
    started = time.perf_counter()
    Fabric(accelerator="cpu", devices=2).launch(lambda fabric: time.sleep(seconds))
    elapsed = (time.perf_counter() - started) * 1000
    assert wait_for_reaping(10)
    return elapsed


def side_by_side(runs: int, off, seconds: float) -> tuple[float, float]:
    times = {"as shipped": [], "without": []}
    for _ in range(2):  # warm-up
        launch_ms(seconds)
    for round_ in range(runs):
        for name in ("as shipped", "without") if round_ % 2 == 0 else ("without", "as shipped"):
            if name == "without":
                with off():
                    times[name].append(launch_ms(seconds))
            else:
                times[name].append(launch_ms(seconds))
    return statistics.median(times["as shipped"]), statistics.median(times["without"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    assert stacks.WHERE_SIGNAL  # the machinery under test
    print(f"empty 2-rank Fabric.launch, {args.runs} runs each, alternating (median ms):")
    shipped, bare = side_by_side(args.runs, without_where, 0.0)
    print(f"  with the where machinery {shipped:.1f}, without {bare:.1f}: ratio {shipped / bare:.3f}")
    runs = max(4, args.runs // 5)
    print(f"2-second 2-rank Fabric.launch, {runs} runs each, alternating (median ms):")
    shipped, bare = side_by_side(runs, without_usage, 2.0)
    print(f"  with usage measured each second {shipped:.1f}, without {bare:.1f}: ratio {shipped / bare:.3f}")


if __name__ == "__main__":
    main()
