"""How a run ended, in words: the state of the run and of each rank, and the text summary that a
`%%fabric` cell leaves in the notebook."""

from __future__ import annotations

from nbfabric.config import RunConfig
from nbfabric.launcher import RankError, RankTimeoutError
from nbfabric.launcher.errors import describe_exit
from nbfabric.launcher.usage import Usage, size
from nbfabric.notebook.chart import MetricSeries

SUMMARY_LINES = 3  # last lines of each rank quoted in the summary


def run_summary(
    config: RunConfig,
    state: str,
    elapsed: float,
    statuses: dict[int, tuple[str, str]],
    line_counts: dict[int, int],
    metrics: MetricSeries,
    tails: dict[int, list[str]],
    peaks: dict[int, Usage] | None = None,
) -> str:
    """Duration, each rank's end (and the peak of what it used, `peaks`, where measured), the last
    metric values and each rank's last lines (`tails`)."""
    lines = [f"nbfabric {config.as_flags()}: {state} after {elapsed:.1f} s"]
    for rank, (status, why) in sorted(statuses.items()):
        count = line_counts.get(rank, 0)
        peak = (peaks or {}).get(rank)
        used = f", peak {size(peak.rss)}" + (f", GPU {size(peak.gpu_memory)}" if peak.gpu_memory is not None else "") if peak else ""
        lines.append(f"  rank {rank}: {status}{': ' + why if why else ''} ({count} line{'' if count == 1 else 's'}{used})")
    last = metrics.last_values()
    if last:
        lines.append("  last values: " + ", ".join(f"{name}={value:.4g} (step {step:g})" for name, (step, value) in last.items()))
    if tails:
        lines.append("  last lines:")
        for rank, tail in sorted(tails.items()):
            lines += [f"    [rank {rank}] {text}" for text in tail[-SUMMARY_LINES:]]
    return "\n".join(lines)


def run_state(error: BaseException | None) -> str:
    if error is None:
        return "done"
    if isinstance(error, KeyboardInterrupt):
        return "stopped"
    if isinstance(error, RankTimeoutError):
        return "timed out"
    return "failed"


def rank_outcome(rank: int, status: str, why: str, error: BaseException | None) -> tuple[str, str]:
    """How one rank ended, given what the run raised: the failing ranks get the reason."""
    if isinstance(error, RankError):
        reasons = {error.rank: error.summary, **{failure.rank: failure.summary for failure in error.also_failed}}
        if rank in reasons:
            return "failed", reasons[rank]
        if rank in error.stopped:
            return "stopped", ""
    if isinstance(error, (KeyboardInterrupt, RankTimeoutError)) and status != "done":
        return "stopped", ""
    if status == "starting":
        return "not started", ""
    if status == "running":
        return "stopped", ""
    return status, why


def status_after_exit(returncode: int) -> tuple[str, str]:
    """A rank's status and reason once its process has ended with `returncode`."""
    return ("done", "") if returncode == 0 else ("failed", describe_exit(returncode))
