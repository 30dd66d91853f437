"""How a `%%fabric` cell shows its run where widgets render: the live dashboard once the run
has lasted DASHBOARD_AFTER seconds; a shorter run ends as plain text, with no widget at all."""

from __future__ import annotations

import time
from typing import Any, Callable

from IPython.display import Image, display

from nbfabric.channel import Display, Metrics
from nbfabric.launcher.output import Sink, TextSink
from nbfabric.config import RunConfig
from nbfabric.notebook import chart
from nbfabric.notebook.summary import run_state
from nbfabric.notebook.tally import RunTally

DASHBOARD_AFTER = 0.5  # seconds; a widget that would vanish at once only flickers and costs ~40 ms


class RunView(Sink):
    """Holds back what the ranks produce until the dashboard appears, which then receives all of it.

    A run that ends first is shown as `--no-widgets` shows it, tagged lines, followed by the
    summary that the dashboard would leave (without the lines just shown), and the chart of its
    metrics as a PNG when it logged any.
    """

    def __init__(self, config: RunConfig, make_dashboard: Callable[[float], Any], text: TextSink):
        self.config = config
        self.started = time.monotonic()
        self.dashboard: Any = None
        self._make_dashboard = make_dashboard
        self._text = text
        self._held: list[tuple[str, tuple]] = []

    def line(self, rank: int, stream: str, text: str) -> None:
        self._pass("line", rank, stream, text)

    def progress(self, rank: int, stream: str, text: str) -> None:
        self._pass("progress", rank, stream, text)

    def metrics(self, event: Metrics) -> None:
        self._pass("metrics", event)

    def display(self, event: Display) -> None:
        self._pass("display", event)

    def rank_exited(self, rank: int, returncode: int) -> None:
        self._pass("rank_exited", rank, returncode)

    def flush(self) -> None:
        if self.dashboard is not None:
            self.dashboard.flush()

    def tick(self) -> bool:
        if self.dashboard is None and time.monotonic() - self.started >= DASHBOARD_AFTER:
            self.dashboard = self._make_dashboard(self.started)
            self.dashboard.show()
            self._replay(self.dashboard)
        return self.dashboard.tick() if self.dashboard is not None else False

    def usage(self, usage: dict) -> None:
        self._pass("usage", usage)

    def places(self, places: dict, *, live: bool) -> None:
        if self.dashboard is not None:
            self.dashboard.places(places, live=live)

    def take_where_request(self) -> bool:
        return self.dashboard is not None and self.dashboard.take_where_request()

    def end(self, error: BaseException | None) -> None:
        """The run is over: leave the dashboard's summary and chart, or the held output as text."""
        if self.dashboard is not None:
            self.dashboard.finish(error)
            self.dashboard.freeze()
            self.dashboard.show_static()
            return
        tally = RunTally(self.config.num_processes)
        for kind, args in self._held:
            getattr(tally, kind)(*args)
        self._replay(self._text)
        self._text.close()
        tally.finish(error)
        elapsed = time.monotonic() - self.started
        print(tally.summary(self.config, run_state(error), elapsed, with_last_lines=False))
        self._text.flush()
        if tally.metric_series:
            display(Image(chart.draw(tally.metric_series.shown(False))))

    def _pass(self, kind: str, *args: Any) -> None:
        if self.dashboard is not None:
            getattr(self.dashboard, kind)(*args)
        else:
            self._held.append((kind, args))

    def _replay(self, sink: Sink) -> None:
        for kind, args in self._held:
            getattr(sink, kind)(*args)
        self._held.clear()
