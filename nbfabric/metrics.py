"""Logged values: kept in order, and streamed from a rank to the launching process as they come."""

from __future__ import annotations

import threading
import time
from typing import Any, NamedTuple

from nbfabric.channel import ChannelWriter, Metrics

STREAM_INTERVAL = 0.02  # seconds between two sends of a rank's new values


class MetricPoint(NamedTuple):
    rank: int
    name: str
    value: Any
    step: int | None
    time: float


class MetricLog:
    """Logged values in order. ``log["loss"]`` lists the values of the lowest rank that logged "loss"
    (rank 0 in a run record, the rank itself inside a rank); ``log.by_rank("loss")`` has them all.

    Inside a rank started by nbfabric (once `send_to` gave it the rank's channel), new values also
    go to the launching process from a background thread, so that `record` never waits on the pipe.
    """

    def __init__(self):
        self.points: list[MetricPoint] = []
        self._channel: ChannelWriter | None = None
        self._sent = 0
        self._sender: threading.Thread | None = None
        self._closing = threading.Event()

    def record(self, rank: int, metrics: dict[str, Any], step: int | None) -> None:
        stamp = time.monotonic()
        for name, value in metrics.items():
            self.points.append(MetricPoint(rank, name, value, step, stamp))
        if self._sender is None and self._channel is not None:
            self._sender = threading.Thread(target=self._send_periodically, name="nbfabric-metrics", daemon=True)
            self._sender.start()

    def send_to(self, channel: ChannelWriter | None) -> None:
        """In a rank: stream new values over `channel` (None: keep them here only)."""
        self._channel = channel

    def extend(self, event: Metrics) -> None:
        """Add the values a rank sent (parent side)."""
        self.points.extend(MetricPoint(event.rank, *point) for point in event.points)

    def __getstate__(self) -> dict[str, Any]:
        """The values only: a channel and a sender belong to the process that has them."""
        return {"points": self.points}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        self.points = state["points"]

    def close(self) -> None:
        """Send what is still unsent and stop the sender thread."""
        if self._sender is not None:
            self._closing.set()
            self._sender.join()
            self._sender = None
        self._send_new()

    def _send_periodically(self) -> None:
        while not self._closing.wait(STREAM_INTERVAL):
            self._send_new()

    def _send_new(self) -> None:
        writer = self._channel
        end = len(self.points)
        if writer is None or end == self._sent:
            return
        batch = self.points[self._sent : end]
        self._sent = end
        for rank in dict.fromkeys(point.rank for point in batch):
            writer.send(Metrics(rank, [point[1:] for point in batch if point.rank == rank]))

    def __getitem__(self, name: str) -> list[Any]:
        by_rank = self.by_rank(name)
        if not by_rank:
            raise KeyError(f"no metric named {name!r}; logged: {', '.join(self.names()) or 'none'}")
        return by_rank[min(by_rank)]

    def by_rank(self, name: str) -> dict[int, list[Any]]:
        values: dict[int, list[Any]] = {}
        for point in self.points:
            if point.name == name:
                values.setdefault(point.rank, []).append(point.value)
        return values

    def names(self) -> list[str]:
        return list(dict.fromkeys(point.name for point in self.points))

    def __len__(self) -> int:
        return len(self.points)
