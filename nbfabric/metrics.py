"""The values a rank logs with `fabric.log`, kept in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MetricPoint:
    rank: int
    name: str
    value: Any
    step: int | None


class MetricLog:
    """Logged values in order; ``log["loss"]`` lists the values logged under that name."""

    def __init__(self):
        self.points: list[MetricPoint] = []

    def record(self, rank: int, metrics: dict[str, Any], step: int | None) -> None:
        self.points.extend(MetricPoint(rank, name, value, step) for name, value in metrics.items())

    def __getitem__(self, name: str) -> list[Any]:
        if name not in self.names():
            raise KeyError(f"no metric named {name!r}; logged: {', '.join(self.names()) or 'none'}")
        return [point.value for point in self.points if point.name == name]

    def names(self) -> list[str]:
        return list(dict.fromkeys(point.name for point in self.points))

    def __len__(self) -> int:
        return len(self.points)
