"""The metrics chart of a run: one panel per logged metric, drawn with matplotlib as PNG bytes."""

from __future__ import annotations

import io
import math
from typing import Any


class MetricSeries:
    """The numeric values each rank logged, per metric name, as (steps, values)."""

    def __init__(self):
        self.series: dict[str, dict[int, tuple[list[float], list[float]]]] = {}
        self.version = 0  # grows with every value added

    def add(self, rank: int, points: list[tuple[str, Any, int | None, float]]) -> None:
        """Add (name, value, step, time) points; values that are not numbers are left out."""
        for name, value, step, _ in points:
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            steps, values = self.series.setdefault(name, {}).setdefault(rank, ([], []))
            steps.append(len(steps) if step is None else step)
            values.append(number)
            self.version += 1

    def shown(self, all_ranks: bool) -> dict[str, dict[int, tuple[list[float], list[float]]]]:
        """Every rank's series, or only the lowest rank's (rank 0 where it logged the metric)."""
        if all_ranks:
            return self.series
        return {name: {min(by_rank): by_rank[min(by_rank)]} for name, by_rank in self.series.items()}

    def last_values(self) -> dict[str, tuple[float, float]]:
        """The lowest rank's last value of each metric, with its step."""
        return {name: (steps[-1], values[-1]) for name, by_rank in self.shown(False).items() for steps, values in by_rank.values()}

    def __bool__(self) -> bool:
        return bool(self.series)


def draw(series: dict[str, dict[int, tuple[list[float], list[float]]]], dpi: int = 80) -> bytes:
    """A PNG with one panel per metric (at most three across), one line per rank."""
    from matplotlib.figure import Figure

    columns = min(3, len(series))
    rows = math.ceil(len(series) / columns)
    figure = Figure(figsize=(3.8 * columns, 2.5 * rows), dpi=dpi)  # fixed margins: a layout engine doubles the cost
    figure.subplots_adjust(left=0.13 / columns + 0.02, right=0.98, bottom=0.18 / rows, top=1 - 0.11 / rows, wspace=0.3, hspace=0.55)
    for index, (name, by_rank) in enumerate(series.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        for rank, (steps, values) in sorted(by_rank.items()):
            axes.plot(steps, values, linewidth=1.4, label=f"rank {rank}", marker="." if len(values) < 30 else None)
        last = min(by_rank)
        axes.set_title(f"{name}  (last {by_rank[last][1][-1]:.4g})", fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
        if len(by_rank) > 1:
            axes.legend(fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
