"""One count of a run as it goes, for every view of it: each rank's status, its line count, last
lines and progress text, and the metric series."""

from __future__ import annotations

from collections import deque

from nbfabric.channel import Display, Metrics
from nbfabric.config import RunConfig
from nbfabric.launcher.output import Sink
from nbfabric.launcher.usage import Usage, highest
from nbfabric.notebook.chart import MetricSeries
from nbfabric.notebook.summary import rank_outcome, run_summary, status_after_exit

LOG_LINES = 300  # last lines kept of the shown ranks, all together and per rank, for a live view
KEPT_LINES = 10_000  # last lines kept of the shown ranks for the cell's saved output


class RunTally(Sink):
    """A Sink that counts: `statuses` (rank -> (status, reason)), `line_counts`, `tail` (the last
    lines of the shown ranks), `rank_tails`, `kept` (far more of them) with the count of
    `kept_dropped` before those, `progress_text`, `metric_series`."""

    def __init__(self, num_ranks: int, shown_ranks: set[int] | frozenset[int] | None = None, keep: int = LOG_LINES):
        self.shown_ranks = shown_ranks
        self.statuses = {rank: ("starting", "") for rank in range(num_ranks)}
        self.line_counts: dict[int, int] = {}
        self.tail: deque[tuple[int, str, str]] = deque(maxlen=keep)
        self.rank_tails: dict[int, deque[tuple[int, str, str]]] = {}
        self.kept: deque[tuple[int, str, str]] = deque(maxlen=KEPT_LINES)
        self.kept_dropped = 0
        self.progress_text: dict[int, str] = {}  # rank -> its latest progress line, or the line that ended it
        self._progress_on: dict[int, str] = {}  # rank -> the stream its progress line is still live on
        self.metric_series = MetricSeries()
        self.usage_now: dict[int, Usage] = {}
        self.usage_peak: dict[int, Usage] = {}
        self._keep = keep

    def line(self, rank: int, stream: str, text: str) -> None:
        if self._progress_on.get(rank) == stream:  # it ends the progress line, as a terminal shows it
            self.progress_text[rank] = text
            del self._progress_on[rank]
        self.line_counts[rank] = self.line_counts.get(rank, 0) + 1
        if self.shown_ranks is None or rank in self.shown_ranks:
            entry = (rank, stream, text)
            self.tail.append(entry)
            self.rank_tails.setdefault(rank, deque(maxlen=self._keep)).append(entry)
            self.kept_dropped += len(self.kept) == self.kept.maxlen
            self.kept.append(entry)

    def progress(self, rank: int, stream: str, text: str) -> None:
        self.progress_text[rank] = text
        self._progress_on[rank] = stream

    def metrics(self, event: Metrics) -> None:
        self.metric_series.add(event.rank, event.points)

    def display(self, event: Display) -> None:
        """Kept, in order with the lines, for the cell's saved output; the live log names it."""
        if self.shown_ranks is None or event.rank in self.shown_ranks:
            self.tail.append((event.rank, "stdout", f"({' or '.join(event.data)}: shown in the cell when the run ends)"))
            self.kept_dropped += len(self.kept) == self.kept.maxlen
            self.kept.append((event.rank, "display", event))

    def rank_exited(self, rank: int, returncode: int) -> None:
        self.statuses[rank] = status_after_exit(returncode)

    def usage(self, usage: dict[int, Usage]) -> None:
        self.usage_now.update(usage)
        for rank, now in usage.items():
            self.usage_peak[rank] = highest(self.usage_peak.get(rank), now)

    def begin(self) -> None:
        """The ranks are running."""
        self.statuses = {rank: ("running", "") if status == "starting" else (status, why) for rank, (status, why) in self.statuses.items()}

    def finish(self, error: BaseException | None) -> None:
        """The run ended with `error` (or None): each rank's final status and its reason."""
        self.statuses = {rank: rank_outcome(rank, status, why, error) for rank, (status, why) in self.statuses.items()}

    def summary(self, config: RunConfig, state: str, elapsed: float, with_last_lines: bool = True) -> str:
        tails = {rank: [text for _, _, text in tail] for rank, tail in self.rank_tails.items()} if with_last_lines else {}
        return run_summary(config, state, elapsed, self.statuses, self.line_counts, self.metric_series, tails, self.usage_peak)
