"""The live run dashboard of a `%%fabric` cell: rank status, log, metrics chart, where the ranks
are, Stop and Where buttons."""

from __future__ import annotations

import html
import time
from contextlib import contextmanager
from typing import Any, Iterator

from IPython.display import Image, display

from nbfabric.channel import Display, Metrics
from nbfabric.config import RunConfig
from nbfabric.launcher.output import Sink, TextSink
from nbfabric.notebook import chart
from nbfabric.notebook.comms import handle_widget_messages
from nbfabric.notebook.summary import run_state
from nbfabric.launcher.stacks import describe_in_full
from nbfabric.notebook.tally import RunTally
from nbfabric.notebook.where import WhereRequests
# While a run goes on, redrawing the status and log, and the chart, may each take at most this
# share of the kernel's time (a redraw that took 0.1 s waits 5 s), and redraws are this far apart at least.
REDRAW_SHARE = 0.015
TEXT_EVERY = 1.0  # seconds, status and log
CHART_EVERY = 2.0  # seconds, chart
PUMP_EVERY = 0.25  # seconds between two looks for widget messages (a Stop click)
ALL = "all"  # the log filter's value for every rank
_COLORS = {"starting": "#888", "running": "#1a73e8", "done": "#188038", "failed": "#c5221f", "stopped": "#b06000", "not started": "#888"}


class Dashboard(Sink):
    """A Sink that shows a run as widgets, redrawn in batches, only what changed, within REDRAW_SHARE
    of the kernel's time.

    At the end, `freeze()` removes it from the notebook and `show_static()` leaves its summary
    as text and its chart as a PNG.
    """

    def __init__(self, config: RunConfig, ranks: set[int] | None = None, started: float | None = None):
        import ipywidgets as widgets

        self.config = config
        self.ranks = ranks
        self.started = time.monotonic() if started is None else started  # when the run began
        self.duration: float | None = None
        self.state = "starting"
        self.stop_requested = False
        self.tally = RunTally(config.num_processes, ranks)
        self._dirty = self._chart_dirty = False
        self._pumped = 0.0
        self._png: tuple[tuple[int, bool], bytes] | None = None
        self._text_budget, self._chart_budget = _Budget(TEXT_EVERY), _Budget(CHART_EVERY)
        self._shown_second = -1
        self._handle: Any = None

        self.header = widgets.HTML()
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger", tooltip="stop every rank")
        self.stop_button.on_click(lambda _: self.request_stop())
        self.where = WhereRequests()
        self.where_button = widgets.Button(description="Where", icon="search", tooltip="show where each rank is now, without stopping the run")
        self.where_button.on_click(lambda _: self.where.ask())
        self.stacks = widgets.HTML(layout=widgets.Layout(display="none"))
        self._stacks_text = ""
        self.status = widgets.HTML()
        shown = sorted(ranks) if ranks is not None else sorted(self.tally.statuses)
        self.log_filter = widgets.Dropdown(
            options=[("all ranks", ALL)] + [(f"rank {rank}", rank) for rank in shown],
            value=shown[0] if ranks is not None and len(ranks) == 1 else ALL,
            description="log",
            style={"description_width": "30px"},
            layout=widgets.Layout(width="170px"),
        )
        self.chart_ranks = widgets.ToggleButtons(
            options=[("rank 0", False), ("all ranks", True)],
            description="chart",
            style={"button_width": "80px", "description_width": "50px"},
            layout=widgets.Layout(width="auto"),
        )
        for control in (self.log_filter, self.chart_ranks):
            control.observe(self._on_view_change, names="value")
        self.log = widgets.HTML()
        self.chart = widgets.Image(format="png", layout=widgets.Layout(display="none", width="auto", max_width="100%", align_self="flex-start"))
        self.widget = widgets.VBox(
            [
                widgets.HBox(
                    [self.header, widgets.HBox([self.where_button, self.stop_button])],
                    layout=widgets.Layout(justify_content="space-between", align_items="center"),
                ),
                self.status,
                widgets.HBox([self.log_filter, self.chart_ranks], layout=widgets.Layout(align_items="center")),
                self.log,
                self.stacks,
                self.chart,
            ],
            layout=widgets.Layout(border="1px solid #ddd", padding="4px 8px"),
        )
        self._render_header()
        self._render_text()

    # ----------------------------------------------------------------- display
    def show(self) -> None:
        """Display the dashboard in the current cell, replaceable later through its display id.

        Its text form is empty, and so is what replaces it: the notebook then reads the same
        whether or not a frontend applied the update (nbval does not), and keeps no widget state.
        """
        bundle = {
            "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0, "model_id": self.widget.model_id},
            "text/plain": "",
        }
        self._handle = display(bundle, raw=True, display_id=True)

    def freeze(self, close: bool = True) -> None:
        """Remove the live dashboard from the notebook; `close` also drops its widgets (a frontend
        that cannot apply the update, to a cell that has finished, keeps showing them)."""
        if self._handle is not None:
            self._handle.update({"text/plain": ""}, raw=True)
        if close:
            _close_tree(self.widget)

    def show_static(self) -> None:
        """Leave in the current cell what a plain cell would: the ranks' output as tagged text
        lines (the last KEPT_LINES), then the text summary and the chart (a PNG)."""
        if self.tally.kept_dropped:
            print(f"(the first {self.tally.kept_dropped} lines are not shown; %%fabric --out NAME keeps every line: NAME.output())")
        text = TextSink()
        for rank, stream, entry in self.tally.kept:
            if stream == "display":
                text.display(entry)
            else:
                text.line(rank, stream, entry)
        text.flush()
        elapsed = self.duration if self.duration is not None else time.monotonic() - self.started
        display({"text/plain": self.tally.summary(self.config, self.state, elapsed, with_last_lines=False)}, raw=True)
        if self._stacks_text and self.state not in ("stopped", "timed out"):  # else the error shows them
            display({"text/plain": self._stacks_text}, raw=True)
        png = self.chart_png()
        if png is not None:
            display(Image(png))

    def settle(self) -> None:
        """After `%fabric wait`: the live dashboard gives way to its summary and chart."""
        self.freeze(close=False)
        self.show_static()

    def chart_png(self) -> bytes | None:
        """The chart as shown (rank 0 or all ranks), drawn again only when a value or the choice changed."""
        series = self.tally.metric_series
        if not series:
            return None
        key = (series.version, self.chart_ranks.value)
        if self._png is None or self._png[0] != key:
            self._png = (key, chart.draw(series.shown(self.chart_ranks.value)))
        return self._png[1]

    # ----------------------------------------------------------------- Sink
    def line(self, rank: int, stream: str, text: str) -> None:
        self.tally.line(rank, stream, text)
        self._dirty = True

    def progress(self, rank: int, stream: str, text: str) -> None:
        self.tally.progress(rank, stream, text)
        self._dirty = True

    def metrics(self, event: Metrics) -> None:
        self.tally.metrics(event)
        self._chart_dirty = True

    def display(self, event: Display) -> None:
        self.tally.display(event)
        self._dirty = True

    def rank_exited(self, rank: int, returncode: int) -> None:
        self.tally.rank_exited(rank, returncode)
        self._dirty = True

    def usage(self, usage: dict) -> None:
        self.tally.usage(usage)
        self._dirty = True

    def places(self, places: dict, *, live: bool) -> None:
        """Show where the ranks are (asked with Where) or were when the run began to stop."""
        elapsed = time.monotonic() - self.started
        title = f"Where the ranks were at {elapsed:.0f} s" if live else "Where the ranks were when the run stopped"
        self._stacks_text = f"{title}:\n{describe_in_full(places) if places else 'no rank was running'}"
        self.stacks.value = (
            "<pre style='margin:4px 0;font-size:12px;line-height:1.3;border:1px solid #eee;background:#fffbea;padding:2px 6px'>"
            f"{html.escape(self._stacks_text)}</pre>"
        )
        self.stacks.layout.display = None
        if live:
            self.where.answer(places)

    def take_where_request(self) -> bool:
        return self.where.take()

    def tick(self) -> bool:
        now = time.monotonic()
        if now - self._pumped >= PUMP_EVERY:
            self._pumped = now
            handle_widget_messages()
        if self.state == "starting":
            self.state = "running"
            self.tally.begin()
            self._dirty = True
            self._shown_second = -1  # the header shows the new state now
        if int(now - self.started) != self._shown_second:
            self._render_header()
        if self._dirty and self._text_budget.due():
            with self._text_budget.spending():
                self._render_text()
        if self._chart_dirty and self.tally.metric_series and self._chart_budget.due():
            with self._chart_budget.spending():
                self._render_chart()
        return self.stop_requested

    @property
    def rank_status(self) -> dict[int, tuple[str, str]]:
        """Each rank's status ("starting", "running", "done", "failed", "stopped", "not started") and its reason."""
        return dict(self.tally.statuses)

    # ----------------------------------------------------------------- control
    def request_stop(self) -> None:
        """Ask the supervisor to stop every rank (at its next tick)."""
        self.stop_requested = True
        self.stop_button.disabled = True
        self.stop_button.description = "Stopping…"

    def finish(self, error: BaseException | None) -> None:
        """The run ended (with `error`, or None): show how each rank ended and the final chart."""
        self.duration = time.monotonic() - self.started
        self.state = run_state(error)
        self.tally.finish(error)
        self.stop_button.layout.display = self.where_button.layout.display = "none"
        self._render_all()

    def summary(self) -> str:
        """Duration, each rank's end, the last metric values and the last lines, as text."""
        elapsed = self.duration if self.duration is not None else time.monotonic() - self.started
        return self.tally.summary(self.config, self.state, elapsed)

    # ----------------------------------------------------------------- rendering
    def _on_view_change(self, change: Any) -> None:
        self._dirty = self._chart_dirty = True
        if self.duration is not None:  # no more ticks: redraw now
            self._render_all()

    def _render_all(self) -> None:
        self._dirty = self._chart_dirty = True
        self._render_header()
        self._render_text()
        if self.tally.metric_series:
            self._render_chart()

    def _render_header(self) -> None:
        elapsed = self.duration if self.duration is not None else time.monotonic() - self.started
        self._shown_second = int(elapsed)
        color = _COLORS.get(self.state, "#333")
        self.header.value = (
            f"<b>nbfabric</b> <code>{html.escape(self.config.as_flags())}</code> "
            f"<span style='color:{color};font-weight:bold'>{self.state}</span> · {elapsed:.0f} s"
        )

    def _render_text(self) -> None:
        self._dirty = False
        self.status.value = self._status_html()
        self.log.value = self._log_html()

    def _render_chart(self) -> None:
        self._chart_dirty = False
        self.chart.value = self.chart_png()
        self.chart.layout.display = None

    def _status_html(self) -> str:
        cells = []
        for rank, (status, why) in sorted(self.tally.statuses.items()):
            detail = why or self.tally.progress_text.get(rank, "")
            used = self.tally.usage_now.get(rank)
            cells.append(
                f"<tr><td>rank {rank}</td><td style='color:{_COLORS[status]};font-weight:bold'>{status}</td>"
                f"<td>{self.tally.line_counts.get(rank, 0)} lines</td>"
                f"<td title='resident memory, CPU (100% = one core), GPU memory held'>{used.text() if used else ''}</td>"
                f"<td><code>{html.escape(detail)}</code></td></tr>"
            )
        return "<table style='border-spacing:12px 0'>" + "".join(cells) + "</table>"

    def _log_html(self) -> str:
        rank = self.log_filter.value
        entries = self.tally.tail if rank == ALL else self.tally.rank_tails.get(rank, ())
        text = "\n".join(
            f"<span style='color:{'#c5221f' if stream == 'stderr' else '#5f6368'}'>[rank {r}]</span> {html.escape(line)}"
            for r, stream, line in entries
        )
        # column-reverse keeps the box scrolled to its newest line
        return (
            "<div style='max-height:16em;overflow-y:auto;display:flex;flex-direction:column-reverse;"
            "border:1px solid #eee;background:#fafafa'>"
            f"<pre style='margin:2px 6px;font-size:12px;line-height:1.3'>{text or '(no output yet)'}</pre></div>"
        )


class _Budget:
    """When a repeated redraw may run next: `every` seconds apart at least, and further apart when
    it is costly, so that it takes at most REDRAW_SHARE of the time."""

    def __init__(self, every: float):
        self.every = every
        self.next = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self.next

    @contextmanager
    def spending(self) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            ended = time.monotonic()
            self.next = ended + max(self.every, (ended - started) / REDRAW_SHARE)


def _close_tree(widget: Any) -> None:
    """Close a widget with its children, layout and style (closing a box leaves them open)."""
    for child in (*getattr(widget, "children", ()), getattr(widget, "layout", None), getattr(widget, "style", None)):
        if child is not None:
            _close_tree(child)
    widget.close()
