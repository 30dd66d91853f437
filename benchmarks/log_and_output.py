"""`fabric.log` cost in a rank and its delivery delay, and 100k lines from 2 ranks all delivered.

    python benchmarks/log_and_output.py [--calls 100000] [--lines 100000]
"""

from __future__ import annotations

import argparse
import statistics
import time

from nbfabric import Fabric
from nbfabric.launcher.output import Sink


class CountingSink(Sink):
    def __init__(self):
        self.lines = 0
        self.delays: list[float] = []

    def line(self, rank, stream, text):
        self.lines += 1

    def metrics(self, event):
        arrived = time.monotonic()
        self.delays.extend(arrived - point[3] for point in event.points)


def log_calls(fabric: Fabric, calls: int) -> list[int]:
    durations = []
    clock = time.perf_counter_ns
    for step in range(calls):
        start = clock()
        fabric.log("loss", 0.5, step=step)
        durations.append(clock() - start)
    return durations


def print_lines(fabric: Fabric, lines: int) -> int:
    for index in range(lines // fabric.world_size):
        print(f"line {index} from rank {fabric.global_rank}")
    return lines // fabric.world_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()

    sink = CountingSink()
    durations = Fabric(accelerator="cpu", devices=2).start_ranks(log_calls, (args.calls,), sink=sink)
    print(f"fabric.log in a rank: median {statistics.median(durations) / 1000:.2f} us, "
          f"p99 {sorted(durations)[int(len(durations) * 0.99)] / 1000:.2f} us over {len(durations)} calls (bar: median <= 5 us)")
    print(f"delivery to the launching process: median {statistics.median(sink.delays) * 1000:.1f} ms, "
          f"max {max(sink.delays) * 1000:.1f} ms over {len(sink.delays)} values (bar: <= 250 ms)")

    sink = CountingSink()
    started = time.perf_counter()
    per_rank = Fabric(accelerator="cpu", devices=2).start_ranks(print_lines, (args.lines,), sink=sink)
    elapsed = time.perf_counter() - started
    print(f"lines: {sink.lines} of {per_rank * 2} delivered in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
