"""nbfabric against hand-written torch.multiprocessing + torch.distributed: empty launches and a DDP loop.

Run as a script: ``python benchmarks/launch_and_train.py [--runs 20] [--epochs 6]``.
Raw timings go to benchmarks/results/launch_and_train.json. Every contender forks its
ranks from this process, which imports torch._dynamo up front (as nbfabric's DDP launch
does), so no rank pays the ~2 s import that DistributedDataParallel would trigger.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch._dynamo  # noqa: F401  (same parent state for every contender; see the module docstring)
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import nbfabric
from nbfabric import Fabric
from nbfabric.launcher.processes import wait_for_reaping

WORLD_SIZE = 2
RESULTS = Path(__file__).resolve().parent / "results" / "launch_and_train.json"

LAUNCH_FLOOR_BAR = 1.5  # Fabric.launch median <= this times the floor's (two bare forks of this process)
LAUNCH_SPREAD_BAR = 2.5
TRAIN_RATIO_BAR = 1.03
LOSS_TOLERANCE = 1e-4

ATTEMPTS = 3  # a failed run (listed in the output) is retried, untimed, up to this often
RUN_TIMEOUT_S = 120.0  # hand-written ranks still running after this are killed (a failed run)

SAMPLES, FEATURES, HIDDEN, CLASSES = 4096, 64, 256, 10
BATCH_SIZE, LEARNING_RATE = 64, 0.05
DATA_SEED, MODEL_SEED = 0, 1

# Built once in the parent; forked ranks of every contender inherit the same tensors.
DATASET: TensorDataset | None = None
EPOCHS = 6


# ----------------------------------------------------------------------------- shared workload
def make_dataset() -> TensorDataset:
    """A fixed, learnable classification problem: labels from a random linear map."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    inputs = torch.randn(SAMPLES, FEATURES, generator=generator)
    labels = (inputs @ torch.randn(FEATURES, CLASSES, generator=generator)).argmax(dim=1)
    return TensorDataset(inputs, labels)


def make_model() -> nn.Module:
    torch.manual_seed(MODEL_SEED)
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES)
    )


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)


def baseline_threads() -> int | None:
    """Intra-op threads a hand-written rank sets: nbfabric's default rule (cores // ranks), or
    none when OMP_NUM_THREADS is set (then both contenders keep the inherited setting)."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, len(os.sched_getaffinity(0)) // WORLD_SIZE)


# ----------------------------------------------------------------------------- nbfabric contenders
def nbfabric_empty(fabric: Fabric) -> None:
    return None


def bare_empty() -> None:
    return None


def handwritten_bare_empty(rank: int) -> None:
    return None


FLOOR_CHILDREN: list[int] = []  # reaped by settle(), untimed, as nbfabric reaps its ranks in the background


def fork_floor() -> None:
    """What this machine charges for two forks of this process whose children say they are done
    at once, and nothing else: no group, no output pipes, no Python work in the children."""
    read_end, write_end = os.pipe()
    for _ in range(WORLD_SIZE):
        pid = os.fork()
        if pid == 0:
            os.write(write_end, b"x")
            os._exit(0)
        FLOOR_CHILDREN.append(pid)
    os.close(write_end)
    while os.read(read_end, WORLD_SIZE):
        pass
    os.close(read_end)


def nbfabric_train(fabric: Fabric) -> dict:
    model = make_model()
    model, optimizer = fabric.setup(model, make_optimizer(model))
    loader = fabric.setup_dataloaders(DataLoader(DATASET, batch_size=BATCH_SIZE, shuffle=True))
    loss_fn = nn.CrossEntropyLoss()
    loss = torch.tensor(float("nan"))
    for _ in range(EPOCHS):
        for inputs, labels in loader:
            loss = loss_fn(model(inputs), labels)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
    return {"loss": loss.item(), "threads": torch.get_num_threads(), "steps": EPOCHS * len(loader)}


# ----------------------------------------------------------------------------- hand-written contenders
def handwritten_empty(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD_SIZE)
    dist.destroy_process_group()


def handwritten_train(rank: int, store: str, report: str) -> None:
    threads = baseline_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD_SIZE)
    # The DDP model dies with ddp_loop, before the group is destroyed, as in nbfabric: a DDP
    # Reducer that holds the last reference to a gloo group can hang in its destructor at exit.
    summary = ddp_loop(rank)
    if rank == 0:
        Path(report).write_text(json.dumps(summary))
    dist.destroy_process_group()


def ddp_loop(rank: int) -> dict:
    model = DistributedDataParallel(make_model())
    optimizer = make_optimizer(model)
    sampler = DistributedSampler(DATASET, num_replicas=WORLD_SIZE, rank=rank, shuffle=True)
    loader = DataLoader(DATASET, batch_size=BATCH_SIZE, sampler=sampler)
    loss_fn = nn.CrossEntropyLoss()
    loss = torch.tensor(float("nan"))
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for inputs, labels in loader:
            loss = loss_fn(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {"loss": loss.item(), "threads": torch.get_num_threads(), "steps": EPOCHS * len(loader)}


def run_handwritten(rank_fn: Callable, *extra: str) -> None:
    """Fork WORLD_SIZE ranks running `rank_fn(rank, store, *extra)` over a fresh file store."""
    workdir = tempfile.mkdtemp(prefix="bench-store-")
    try:
        store = Path(workdir, "store").as_uri()
        context = mp.start_processes(rank_fn, args=(store, *extra), nprocs=WORLD_SIZE, join=False, start_method="fork")
        join_or_kill(context, RUN_TIMEOUT_S)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def join_or_kill(context: mp.ProcessContext, timeout: float) -> None:
    """`context.join()` (which raises if a rank failed), killing every rank after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
                process.join()
            raise TimeoutError(f"hand-written ranks still running after {timeout:.0f} s; killed")


def run_handwritten_train() -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-report-") as folder:
        report = os.path.join(folder, "rank0.json")
        run_handwritten(handwritten_train, report)
        return json.loads(Path(report).read_text())


# ----------------------------------------------------------------------------- measuring


@dataclass
class Sample:
    """One run: wall clock in this process, and CPU time (user + system) its reaped ranks used."""

    wall_ms: float
    rank_cpu_ms: float


def children_cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1e3


def settle() -> None:
    """Reap the children that a contender returned before they were gone (nbfabric's ranks after
    they reported, the floor's children), so that their CPU time is counted and the next run
    starts on an idle machine."""
    assert wait_for_reaping(RUN_TIMEOUT_S), "nbfabric's ranks did not exit"
    while FLOOR_CHILDREN:
        os.waitpid(FLOOR_CHILDREN.pop(), 0)


def timed(fn: Callable[[], object]) -> tuple[Sample, object]:
    """Run `fn()`; the wall clock until it returned, the CPU time of its children once they are
    reaped, and what it returned."""
    cpu, start = children_cpu_ms(), time.perf_counter()
    value = fn()
    wall_ms = (time.perf_counter() - start) * 1e3
    settle()
    return Sample(wall_ms, children_cpu_ms() - cpu), value


def attempt(name: str, fn: Callable[[], object], failures: dict[str, list[str]]) -> tuple[Sample, object]:
    """`timed(fn)`, run again when it raises; each failure is recorded under `name`."""
    for _ in range(ATTEMPTS):
        try:
            return timed(fn)
        except Exception as exc:  # noqa: BLE001 - a flaky run is reported, not fatal
            failures[name].append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}")
    raise RuntimeError(f"{name} failed {ATTEMPTS} times in a row; last: {failures[name][-1]}")


def measure(contenders: dict[str, Callable[[], object]], runs: int):
    """One warm-up call each, then `runs` rounds; each round calls every contender once,
    in an order that reverses every other round so drift hits all of them alike.

    Returns the samples, each contender's last return value, and its failed attempts."""
    names = list(contenders)
    failures: dict[str, list[str]] = {name: [] for name in names}
    last = {name: attempt(name, contenders[name], failures)[1] for name in names}
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for round_index in range(runs):
        for name in names if round_index % 2 == 0 else reversed(names):
            sample, last[name] = attempt(name, contenders[name], failures)
            samples[name].append(sample)
    return samples, last, failures


def wall(samples: dict[str, list[Sample]]) -> dict[str, list[float]]:
    return {name: [s.wall_ms for s in runs] for name, runs in samples.items()}


def rank_cpu(samples: dict[str, list[Sample]]) -> dict[str, list[float]]:
    return {name: [s.rank_cpu_ms for s in runs] for name, runs in samples.items()}


def summarize(samples: list[float]) -> dict[str, float]:
    median = statistics.median(samples)
    return {"median_ms": median, "min_ms": min(samples), "max_ms": max(samples), "max_over_median": max(samples) / median}


# ----------------------------------------------------------------------------- reporting
def paired_ratios(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Median and quartiles of the per-round ratios (each round ran both contenders back to back)."""
    q1, median, q3 = statistics.quantiles([a / b for a, b in zip(numerator, denominator)], n=4)
    return {"median": median, "q1": q1, "q3": q3}


def describe_paired(paired: dict[str, float]) -> str:
    return f"per-round ratio median {paired['median']:.3f} (quartiles {paired['q1']:.3f}-{paired['q3']:.3f})"


def print_table(title: str, samples: dict[str, list[Sample]], failures: dict[str, list[str]]) -> None:
    """Wall clock statistics per contender, the median CPU time of its ranks, and failed runs."""
    print(f"\n{title}")
    print(f"  {'contender':<42}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'max/med':>9}"
          f"{'rank CPU ms':>13}{'failed':>8}")
    cpu = rank_cpu(samples)
    for name, times in wall(samples).items():
        s = summarize(times)
        print(f"  {name:<42}{s['median_ms']:>11.1f}{s['min_ms']:>9.1f}{s['max_ms']:>9.1f}"
              f"{s['max_over_median']:>9.2f}{statistics.median(cpu[name]):>13.1f}{len(failures[name]):>8}")
    for name, messages in failures.items():
        for message in messages:
            print(f"  failed run of {name}: {message[:160]}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report_launch(times: dict[str, list[float]]) -> dict:
    fabric, hand = summarize(times["nbfabric Fabric.launch"]), summarize(times["hand-written mp fork + gloo"])
    ratio = fabric["median_ms"] / hand["median_ms"]
    paired = paired_ratios(times["nbfabric Fabric.launch"], times["hand-written mp fork + gloo"])
    bare_ratio = (statistics.median(times["nbfabric.launch (no process group)"])
                  / statistics.median(times["hand-written mp fork (no process group)"]))
    print(f"  ratio nbfabric/hand-written (medians): {ratio:.2f} with a process group ({describe_paired(paired)}), "
          f"{bare_ratio:.2f} without")
    floor = statistics.median(times["floor: 2 bare forks that report"])
    floor_ratio = fabric["median_ms"] / floor
    floor_paired = paired_ratios(times["nbfabric Fabric.launch"], times["floor: 2 bare forks that report"])
    median_ok, spread_ok = floor_ratio <= LAUNCH_FLOOR_BAR, fabric["max_over_median"] <= LAUNCH_SPREAD_BAR
    print(f"  floor (two bare forks of this {rss_mb():.0f} MB process, whose children report at once): {floor:.1f} ms; "
          f"Fabric.launch spends {fabric['median_ms'] - floor:.1f} ms more")
    print(f"  bar: Fabric.launch median <= {LAUNCH_FLOOR_BAR}x the floor's: {floor_ratio:.2f} ({describe_paired(floor_paired)}) "
          f"{verdict(median_ok)}; max <= {LAUNCH_SPREAD_BAR}x median: {verdict(spread_ok)}")
    return {"ratio": ratio, "paired_ratio": paired, "bare_ratio": bare_ratio, "floor_ms": floor, "floor_ratio": floor_ratio,
            "median_bar_ok": median_ok, "spread_bar_ok": spread_ok}


def rss_mb() -> float:
    """Resident memory of this process, which forking copies the page tables of."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def report_train(times: dict[str, list[float]], cpu: dict[str, list[float]], results: dict[str, dict]) -> dict:
    fabric, hand = summarize(times["nbfabric DDP loop"]), summarize(times["hand-written DDP loop"])
    cpu_ratio = statistics.median(cpu["nbfabric DDP loop"]) / statistics.median(cpu["hand-written DDP loop"])
    ratio = fabric["median_ms"] / hand["median_ms"]
    paired = paired_ratios(times["nbfabric DDP loop"], times["hand-written DDP loop"])
    losses = {name: result["loss"] for name, result in results.items()}
    difference = abs(losses["nbfabric DDP loop"] - losses["hand-written DDP loop"])
    same_work = difference <= LOSS_TOLERANCE and len({r["steps"] for r in results.values()}) == 1
    same_threads = len({r["threads"] for r in results.values()}) == 1
    print(f"  ratio nbfabric/hand-written (medians): {ratio:.3f}; bar <= {TRAIN_RATIO_BAR}: "
          f"{verdict(ratio <= TRAIN_RATIO_BAR)}; {describe_paired(paired)}")
    print(f"  ratio of the ranks' median CPU time (less sensitive to other load): {cpu_ratio:.3f}")
    for name, result in results.items():
        print(f"  {name}: final loss {result['loss']:.6f}, {result['steps']} steps/rank, "
              f"{result['threads']} intra-op thread(s)/rank")
    print(f"  same work (|loss difference| {difference:.1e} <= {LOSS_TOLERANCE:.0e}, equal steps): {verdict(same_work)}; "
          f"equal threads: {verdict(same_threads)}")
    return {"ratio": ratio, "paired_ratio": paired, "rank_cpu_ratio": cpu_ratio, "ratio_bar_ok": ratio <= TRAIN_RATIO_BAR,
            "loss_difference": difference,
            "same_work": same_work, "same_threads": same_threads, "final": results}


def write_results(payload: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2))
    print(f"\nraw timings: {RESULTS}")


# ----------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per contender (default 20)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"epochs of the DDP loop (default {EPOCHS})")
    return parser.parse_args()


def launch_contenders() -> dict[str, Callable[[], object]]:
    return {
        "nbfabric Fabric.launch": lambda: Fabric(accelerator="cpu", devices=WORLD_SIZE).launch(nbfabric_empty),
        "hand-written mp fork + gloo": lambda: run_handwritten(handwritten_empty),
        "nbfabric.launch (no process group)": lambda: nbfabric.launch(bare_empty, nprocs=WORLD_SIZE),
        "hand-written mp fork (no process group)": lambda: mp.start_processes(
            handwritten_bare_empty, nprocs=WORLD_SIZE, join=True, start_method="fork"
        ),
        "floor: 2 bare forks that report": fork_floor,
    }


def train_contenders() -> dict[str, Callable[[], object]]:
    return {
        "nbfabric DDP loop": lambda: Fabric(accelerator="cpu", devices=WORLD_SIZE).launch(nbfabric_train),
        "hand-written DDP loop": run_handwritten_train,
    }


def main() -> None:
    global DATASET, EPOCHS
    args = parse_args()
    if args.runs < 2 or args.epochs < 1:
        sys.exit("--runs must be at least 2 and --epochs at least 1")
    DATASET, EPOCHS = make_dataset(), args.epochs
    threads = baseline_threads()
    thread_rule = (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} set by the user: both contenders keep it"
                   if threads is None else
                   f"OMP_NUM_THREADS unset: nbfabric sets {threads} thread(s)/rank, the hand-written ranks "
                   f"call torch.set_num_threads({threads})")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {len(os.sched_getaffinity(0))} cores, "
          f"{WORLD_SIZE} ranks, gloo, fork; {args.runs} timed runs each after one warm-up, alternating")
    print(thread_rule)
    load_before = os.getloadavg()[0]
    print(f"1-minute load average before: {load_before:.2f} (other work on these cores skews the timings)")

    launch_samples, _, launch_failures = measure(launch_contenders(), args.runs)
    print_table("1. empty 2-rank launch (wall clock in the parent)", launch_samples, launch_failures)
    launch_report = report_launch(wall(launch_samples))

    train_samples, train_results, train_failures = measure(train_contenders(), args.runs)
    print_table(f"2. DDP loop: MLP {FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES}, {SAMPLES} samples, batch {BATCH_SIZE}, "
                f"{EPOCHS} epochs, SGD (launch to return)", train_samples, train_failures)
    train_report = report_train(wall(train_samples), rank_cpu(train_samples), train_results)
    load_after = os.getloadavg()[0]
    print(f"\n1-minute load average after: {load_after:.2f}")

    write_results({
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cores": len(os.sched_getaffinity(0)), "world_size": WORLD_SIZE, "threads": thread_rule,
                        "load_average_1min": {"before": load_before, "after": load_after}},
        "runs": args.runs,
        "epochs": EPOCHS,
        "launch": section_results(launch_samples, launch_failures, launch_report),
        "train": section_results(train_samples, train_failures, train_report),
    })


def section_results(samples: dict[str, list[Sample]], failures: dict[str, list[str]], report: dict) -> dict:
    times = wall(samples)
    return {"times_ms": times, "rank_cpu_ms": rank_cpu(samples), "failures": failures,
            "summary": {name: summarize(t) for name, t in times.items()}, **report}


if __name__ == "__main__":
    main()
