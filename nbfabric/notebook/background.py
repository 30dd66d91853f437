"""A `%%fabric --background` run: launched from a thread that lives until every rank has ended."""

from __future__ import annotations

import atexit
import contextvars
import threading
import time
from typing import Any, Callable

from nbfabric.launcher.output import TextSink
from nbfabric.notebook.comms import handle_widget_messages
from nbfabric.notebook.where import WhereRequests
from nbfabric.record import RunRecord

STOP_WAIT = 10.0  # seconds `stop()` waits for the ranks to end (the stop ladder takes under 2 s)


class StoppableTextSink(TextSink):
    """The text view of a background run, which `%fabric stop` can end and `%fabric where` ask."""

    stop_requested = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.where = WhereRequests()

    def request_stop(self) -> None:
        self.stop_requested = True

    def tick(self) -> bool:
        return self.stop_requested

    def take_where_request(self) -> bool:
        return self.where.take()

    def places(self, places: dict, *, live: bool) -> None:
        if live:
            self.where.answer(places)

    def settle(self) -> None:
        """After `%fabric wait`: the lines are already in the cell."""


class BackgroundRun:
    """Runs `launch()` in a thread, in the launching cell's context (so its output stays there).

    `view` is the run's Sink (a Dashboard or a StoppableTextSink); `finish(error)` is called in
    the thread when the run ends. The result waits for `wait()`.
    """

    def __init__(self, label: str, launch: Callable[[], Any], record: RunRecord, view: Any, finish: Callable[[BaseException | None], None]):
        self.label = label
        self.record = record
        self.view = view
        self.returned: Any = None
        self._launch = launch
        self._finish = finish
        self._ended = threading.Event()
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name="nbfabric-background", daemon=True)
        atexit.register(self.stop)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self.returned = self._launch()
        except BaseException as error:  # delivered by wait()
            self.record.error = error
        finally:
            self.record.duration = time.time() - self.record.started
            atexit.unregister(self.stop)
            self._finish(self.record.error)
            self._ended.set()

    def stop(self) -> None:
        """Stop every rank and wait (a bounded time) for the run to end."""
        self.view.request_stop()
        self._thread.join(STOP_WAIT)

    def wait(self) -> Any:
        """Block until the run ends (handling widget clicks meanwhile). Returns what the ranks sent
        back, or raises the run's error. An interrupt stops the waiting, not the run."""
        try:
            while not self._ended.wait(0.1):  # not Thread.join: an interrupt there leaves the thread taken for ended (Python < 3.13)
                handle_widget_messages()
            self._thread.join()
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                f"stopped waiting; the background run {self.label} goes on: %fabric wait waits for it again, %fabric stop ends it"
            ) from None
        if self.record.error is not None:
            raise self.record.error
        return self.returned
