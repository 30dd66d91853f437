"""The live run dashboard of a `%%fabric` cell: rank status, log, metrics chart, Stop button."""

from __future__ import annotations

import html
import time
from typing import Any

from IPython.display import Image, display

from nbfabric.channel import Metrics
from nbfabric.config import RunConfig
from nbfabric.launcher.output import Sink
from nbfabric.notebook import chart
from nbfabric.notebook.comms import handle_widget_messages
from nbfabric.notebook.summary import run_state
from nbfabric.notebook.tally import RunTally
RENDER_EVERY = 0.25  # seconds between two updates of the status and the log
CHART_EVERY = 0.5  # seconds between two redraws of the chart
PUMP_EVERY = 0.1  # seconds between two looks for widget messages (a Stop click)
ALL = "all"  # the log filter's value for every rank
_COLORS = {"starting": "#888", "running": "#1a73e8", "done": "#188038", "failed": "#c5221f", "stopped": "#b06000", "not started": "#888"}


class Dashboard(Sink):
    """A Sink that shows a run as widgets, updated in batches at most every RENDER_EVERY seconds.

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
        self._rendered = self._charted = self._pumped = 0.0
        self._shown_second = -1
        self._handle: Any = None

        self.header = widgets.HTML()
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger", tooltip="stop every rank")
        self.stop_button.on_click(lambda _: self.request_stop())
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
                widgets.HBox([self.header, self.stop_button], layout=widgets.Layout(justify_content="space-between", align_items="center")),
                self.status,
                widgets.HBox([self.log_filter, self.chart_ranks], layout=widgets.Layout(align_items="center")),
                self.log,
                self.chart,
            ],
            layout=widgets.Layout(border="1px solid #ddd", padding="4px 8px"),
        )
        self._render(charts=False)

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
        """Display the text summary and the chart (a PNG) in the current cell."""
        display({"text/plain": self.summary()}, raw=True)
        png = self.chart_png()
        if png is not None:
            display(Image(png))

    def settle(self) -> None:
        """After `%fabric wait`: the live dashboard gives way to its summary and chart."""
        self.freeze(close=False)
        self.show_static()

    def chart_png(self) -> bytes | None:
        return chart.draw(self.tally.metric_series.shown(self.chart_ranks.value)) if self.tally.metric_series else None

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

    def rank_exited(self, rank: int, returncode: int) -> None:
        self.tally.rank_exited(rank, returncode)
        self._dirty = True

    def tick(self) -> bool:
        now = time.monotonic()
        if now - self._pumped >= PUMP_EVERY:
            self._pumped = now
            handle_widget_messages()
        if self.state == "starting":
            self.state = "running"
            self.tally.begin()
            self._dirty = True
        if now - self._rendered >= RENDER_EVERY or int(now - self.started) != self._shown_second:
            self._render(charts=now - self._charted >= CHART_EVERY)
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
        self.stop_button.layout.display = "none"
        self._dirty = self._chart_dirty = True
        self._render(charts=True)

    def summary(self) -> str:
        """Duration, each rank's end, the last metric values and the last lines, as text."""
        elapsed = self.duration if self.duration is not None else time.monotonic() - self.started
        return self.tally.summary(self.config, self.state, elapsed)

    # ----------------------------------------------------------------- rendering
    def _on_view_change(self, change: Any) -> None:
        self._dirty = self._chart_dirty = True
        if self.duration is not None:  # no more ticks: redraw now
            self._render(charts=True)

    def _render(self, charts: bool) -> None:
        now = time.monotonic()
        elapsed = (self.duration if self.duration is not None else now - self.started)
        self._shown_second = int(elapsed)
        color = _COLORS.get(self.state, "#333")
        self.header.value = (
            f"<b>nbfabric</b> <code>{html.escape(self.config.as_flags())}</code> "
            f"<span style='color:{color};font-weight:bold'>{self.state}</span> · {elapsed:.0f} s"
        )
        if self._dirty:
            self._dirty = False
            self._rendered = now
            self.status.value = self._status_html()
            self.log.value = self._log_html()
        if charts and self._chart_dirty and self.tally.metric_series:
            self._chart_dirty = False
            self._charted = now
            self.chart.value = self.chart_png()
            self.chart.layout.display = None

    def _status_html(self) -> str:
        cells = []
        for rank, (status, why) in sorted(self.tally.statuses.items()):
            detail = why or self.tally.progress_text.get(rank, "")
            cells.append(
                f"<tr><td>rank {rank}</td><td style='color:{_COLORS[status]};font-weight:bold'>{status}</td>"
                f"<td>{self.tally.line_counts.get(rank, 0)} lines</td><td><code>{html.escape(detail)}</code></td></tr>"
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


def _close_tree(widget: Any) -> None:
    """Close a widget with its children, layout and style (closing a box leaves them open)."""
    for child in (*getattr(widget, "children", ()), getattr(widget, "layout", None), getattr(widget, "style", None)):
        if child is not None:
            _close_tree(child)
    widget.close()
