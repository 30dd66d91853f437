"""A run record: the settings, how each rank ended, every output line and the logged metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from nbfabric.channel import Display, Metrics
from nbfabric.config import RunConfig
from nbfabric.launcher.output import Sink
from nbfabric.metrics import MetricLog


@dataclass
class RunRecord:
    """What `%%fabric --out NAME` keeps: ``run.metrics["loss"]``, ``run.output(rank=1)``, ``run.returncodes``."""

    config: RunConfig
    lines: list[tuple[int, str, str]] = field(default_factory=list)  # (rank, "stdout"|"stderr", text)
    metrics: MetricLog = field(default_factory=MetricLog)
    returncodes: dict[int, int] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    duration: float | None = None
    error: BaseException | None = None

    def output(self, rank: int | None = None, stream: str | None = None) -> str:
        """The lines of one rank (or all, tagged), optionally of one stream, as text."""
        return "\n".join(
            text if rank is not None else f"[rank {r}] {text}"
            for r, s, text in self.lines
            if (rank is None or r == rank) and (stream is None or s == stream)
        )

    def __repr__(self) -> str:
        status = "running" if self.duration is None else ("failed" if self.error else "done")
        seconds = f", {self.duration:.2f} s" if self.duration is not None else ""
        return (
            f"<RunRecord {self.config.as_flags()}: {status}{seconds}, {len(self.lines)} lines, "
            f"metrics {self.metrics.names()}, exit codes {self.returncodes}>"
        )


class RecordingSink(Sink):
    """Keeps everything in a RunRecord and passes it on to another sink."""

    def __init__(self, record: RunRecord, inner: Sink):
        self.record = record
        self.inner = inner

    def line(self, rank: int, stream: str, text: str) -> None:
        self.record.lines.append((rank, stream, text))
        self.inner.line(rank, stream, text)

    def progress(self, rank: int, stream: str, text: str) -> None:
        self.inner.progress(rank, stream, text)

    def metrics(self, event: Metrics) -> None:
        self.record.metrics.extend(event)
        self.inner.metrics(event)

    def display(self, event: Display) -> None:
        self.inner.display(event)

    def rank_exited(self, rank: int, returncode: int) -> None:
        self.record.returncodes[rank] = returncode
        self.inner.rank_exited(rank, returncode)

    def close(self) -> None:
        self.inner.close()

    def flush(self) -> None:
        self.inner.flush()

    def tick(self) -> bool:
        return self.inner.tick()

    def places(self, places: dict, *, live: bool) -> None:
        self.inner.places(places, live=live)

    def take_where_request(self) -> bool:
        return self.inner.take_where_request()

    def usage(self, usage: dict) -> None:
        self.inner.usage(usage)
