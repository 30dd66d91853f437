"""How splitting rank output into lines scales: seconds per MB for one long line without a
newline and for many short lines, fed in pipe-sized chunks, at growing sizes. Linear splitting
keeps the seconds per MB flat (a ratio near 1 between the largest and the smallest size)."""

from __future__ import annotations

import argparse
import statistics
import time

from nbfabric.launcher.output import LineSplitter

CHUNK = 1 << 16  # what one read of a pipe returns at most


def split_seconds(data: bytes) -> float:
    splitter = LineSplitter()
    started = time.perf_counter()
    for start in range(0, len(data), CHUNK):
        splitter.feed(data[start : start + CHUNK])
    splitter.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10,20,40", help="sizes in MB (default: 10,20,40)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    print(f"{'input':<22}{'MB':>6}{'median s':>11}{'s per MB':>11}")
    for name, make in (("one line, no newline", lambda mb: b"x" * (mb << 20)), ("lines of 12 bytes", lambda mb: b"step 123456\n" * ((mb << 20) // 12))):
        per_mb = []
        for size in sizes:
            data = make(size)
            median = statistics.median(split_seconds(data) for _ in range(args.runs))
            per_mb.append(median / size)
            print(f"{name:<22}{size:>6}{median:>11.3f}{median / size:>11.4f}")
        print(f"{name:<22} seconds per MB, largest / smallest size: {per_mb[-1] / per_mb[0]:.2f}")


if __name__ == "__main__":
    main()
