"""DeepSpeed ZeRO-2 against DDP: the same 2-rank CPU training run (gloo), alternating; and Lightning's `deepspeed`.

    pip install 'nbfabric[deepspeed]'
    python benchmarks/deepspeed_vs_ddp.py [--runs 5] [--steps 100]

Per run: milliseconds per training step (after 10 warm-up steps, rank 0's clock) and launch to
return (engine set-up included); medians and the ratio ZeRO-2 / DDP. Both must end at the same loss
(within 1e-4) or the run says FAIL. Lightning's DeepSpeed strategy is tried on the same run: it
runs only on CUDA GPUs, and the script prints its own message where it does not run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))


def train(fabric, steps: int) -> tuple[float, float]:
    """Milliseconds per step after 10 warm-up steps, and the final loss averaged over the ranks."""
    model = make_model()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    generator = torch.Generator().manual_seed(fabric.global_rank)
    x = torch.randn(64, 256, generator=generator)
    for step in range(steps + 10):
        if step == 10:
            started = time.perf_counter()
        loss = F.mse_loss(model(x), x)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
    per_step = (time.perf_counter() - started) * 1000 / steps
    return per_step, fabric.all_reduce(loss.detach()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    from nbfabric import Fabric

    contenders = {"DDP": "ddp", "ZeRO-2": "deepspeed_stage_2"}
    step_ms: dict[str, list[float]] = {name: [] for name in contenders}
    total_s: dict[str, list[float]] = {name: [] for name in contenders}
    losses: dict[str, float] = {}
    for run in range(args.runs + 1):  # run 0 warms up (imports, first engine)
        order = list(contenders) if run % 2 else list(reversed(contenders))
        for name in order:
            started = time.perf_counter()
            per_step, loss = Fabric(accelerator="cpu", devices=2, strategy=contenders[name]).launch(train, args.steps)
            if run:
                step_ms[name].append(per_step)
                total_s[name].append(time.perf_counter() - started)
                losses[name] = loss
    print(f"2 CPU ranks (gloo), MLP 256-1024-1024-256, AdamW, {args.steps} steps, {args.runs} runs each, medians:")
    for name in contenders:
        print(f"  {name:7} {statistics.median(step_ms[name]):7.2f} ms/step   {statistics.median(total_s[name]):6.2f} s launch to return   final loss {losses[name]:.6f}")
    ratio = statistics.median(step_ms["ZeRO-2"]) / statistics.median(step_ms["DDP"])
    print(f"  ZeRO-2 / DDP per step: {ratio:.2f}x; same loss: {'ok' if abs(losses['ZeRO-2'] - losses['DDP']) <= 1e-4 else 'FAIL'}")
    print("Lightning's deepspeed strategy on the same run:", lightning_deepspeed())


def lightning_deepspeed() -> str:
    """Lightning's check that each of its ranks runs first (its launcher re-runs this script in new
    processes, so it is not launched here): on CPU it refuses."""
    try:
        import lightning as L

        L.Fabric(accelerator="cpu", devices=2, strategy="deepspeed").strategy.setup_environment()
    except Exception as error:  # noqa: BLE001 - its own words are the result
        return f"does not run here: {type(error).__name__}: {error}"
    return "passes its CPU check; time it with `lightning run model` on the same model"


if __name__ == "__main__":
    main()
