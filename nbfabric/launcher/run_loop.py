"""One run's loop, for every launcher that supervises ranks: the deadline, interrupts and the Stop
button, the sink's tick, the stop schedule and the outcome. A launcher fills in how its ranks are
watched (`poll`), asked to stop (`stop_ranks`) and pressed when they do not (`escalate`)."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

from nbfabric.channel import Failure, Left, Result, now
from nbfabric.launcher.cell_labels import label_place
from nbfabric.launcher.output import Sink
from nbfabric.launcher.stacks import RankPlace
from nbfabric.launcher.usage import SAMPLE_EVERY, Usage, UsageMeter

IDLE_CPU_PERCENT = 5.0  # of one core: a rank blocked in a collective uses about none
TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # stop the ranks first, then end as they ask


@dataclass
class Outcome:
    """How a run ended, as its loop observed it."""

    returncodes: dict[int, int] = field(default_factory=dict)
    exit_times: dict[int, float] = field(default_factory=dict)
    failures: dict[int, Failure] = field(default_factory=dict)
    left: dict[int, Left] = field(default_factory=dict)  # ranks whose code called sys.exit
    announced: dict[int, int] | None = None  # rank -> the exit code it said it ends with (None: ranks that do not say, a pool's)
    result: Result | Any = None  # rank 0's value as the launcher received it
    stop_time: float | None = None  # when the loop began stopping ranks
    interrupted: bool = False
    timed_out: bool = False
    still_running_at_stop: tuple[int, ...] = ()
    places: dict[int, RankPlace] = field(default_factory=dict)  # where those ranks were, taken before the stop
    stranded: tuple[int, ...] = ()  # finished ranks whose peers were stopped waiting for them in a collective
    usage: dict[int, Usage] = field(default_factory=dict)  # each rank's last measured usage


class RunLoop:
    """`run()` polls the ranks until `done()`, and after each poll: passes the output on, takes an
    interrupt or the Stop button as a stop request, stops the ranks at the deadline or when they wait
    in a collective that a finished peer will never join, and presses ranks that were asked to stop
    and still run (`escalate`)."""

    tick_seconds = 0.1
    stranded_look_seconds = 1.5  # between two looks at ranks that may wait for a finished peer

    def __init__(self, sink: Sink, timeout: float | None):
        self.sink = sink
        self.deadline = None if timeout is None else now() + timeout
        self.outcome = Outcome()
        self.interrupts = 0
        self.terminated_by: int | None = None  # SIGTERM or SIGHUP, once received
        self._meter: UsageMeter | None = None
        self._next_sample = now() + SAMPLE_EVERY / 2
        self._stranded_look: tuple[float, dict[int, str] | None] | None = None  # (when next, what the last look saw)

    # What a launcher fills in.
    def start(self) -> None:
        """Begin watching the ranks."""

    def done(self) -> bool:
        """Whether every rank has ended and its output has arrived."""
        raise NotImplementedError

    def poll(self, wait: float) -> None:
        """Wait up to `wait` seconds for the ranks' output and events, and take them in."""
        raise NotImplementedError

    def running_ranks(self) -> tuple[int, ...]:
        """The ranks that have not ended yet."""
        raise NotImplementedError

    def finished_ranks(self) -> tuple[int, ...]:
        """The ranks that have done their part of the run, and wait for their peers or have ended."""
        return ()

    def rank_pids(self) -> dict[int, int]:
        """rank -> pid of the ranks whose usage can be measured from here (those on this machine)."""
        return {}

    def where(self, ranks: tuple[int, ...]) -> dict[int, RankPlace]:
        """Where each of these running ranks is now (their stacks), without disturbing them."""
        return {}

    def stop_ranks(self) -> None:
        """Ask the running ranks to stop (first step of a stop)."""

    def escalate(self, waited: float, impatient: bool) -> None:
        """Press ranks that still run `waited` seconds after the stop began (`impatient`: a second interrupt)."""

    def end(self) -> None:
        """After the loop, also when it raised: release what watching the ranks took."""

    # The loop.
    def run(self) -> Outcome:
        try:
            with interrupts_as_requests(self._count_interrupt, self._terminate):
                self.start()
                while not self.done():
                    self.poll(self._wait_time())
                    self._after_poll()
        finally:
            if self._meter is not None:
                self._meter.close()
            self.end()
        if self.terminated_by is not None:  # every rank has been stopped: now end as the signal asked
            print(f"nbfabric: {signal.Signals(self.terminated_by).name}: every rank was stopped", file=sys.stderr, flush=True)
            signal.raise_signal(self.terminated_by)
        return self.outcome

    def stop(self, *, interrupted: bool = False) -> None:
        """Begin stopping every rank still running (safe to call more than once), after taking where
        each of them is."""
        self.outcome.interrupted |= interrupted
        if self.outcome.stop_time is not None:
            return
        self.outcome.stop_time = now()
        self.outcome.still_running_at_stop = self.running_ranks()
        self.outcome.places = self._places(self._not_failed(self.outcome.still_running_at_stop))
        if self.outcome.places:
            self.sink.places(self.outcome.places, live=False)
        self.stop_ranks()

    def _places(self, running: tuple[int, ...]) -> dict[int, RankPlace]:
        """Where each of the `running` ranks is, and each rank that has done its part and no
        longer runs (a pool's rank) as finished; not those that left by sys.exit."""
        places = self.where(running) if running else {}
        for rank in self.finished_ranks():
            if rank not in places and rank not in self.outcome.left:
                places[rank] = RankPlace(rank, ended=True)
        return places

    def _rank_left(self, event: Left) -> None:
        """The rank's code called sys.exit: said in its stderr; a status of 0 fails nothing."""
        event = replace(event, where=label_place(event.where))
        self.outcome.left[event.rank] = event
        self.sink.line(event.rank, "stderr", f"left the run: sys.exit({event.code}) at {event.where}")

    def _after_poll(self) -> None:
        self.sink.flush()
        if self.sink.tick():  # the Stop button
            self.interrupts = max(self.interrupts, 1)
        if now() >= self._next_sample and self.outcome.stop_time is None:
            self._sample_usage()
        if self.sink.take_where_request() and self.outcome.stop_time is None:
            self.sink.places(self._places(self._not_failed(self.running_ranks())), live=True)
        if self.interrupts:
            self.stop(interrupted=True)
        if self.deadline is not None and now() >= self.deadline and self.outcome.stop_time is None:
            self.outcome.timed_out = True
            self.stop()
        if self.outcome.stop_time is None:
            self._look_for_stranded()
        if self.outcome.stop_time is not None:
            self.escalate(now() - self.outcome.stop_time, self.interrupts > 1)

    def _look_for_stranded(self) -> None:
        """Stop the run when a rank has finished and every other rank still running waits, without
        using the CPU, in a torch.distributed call at the same place on two looks in a row: a
        collective that the finished rank never reached, which would otherwise wait forever."""
        finished = set(self.finished_ranks())
        others = tuple(rank for rank in self._not_failed(self.running_ranks()) if rank not in finished)
        if not finished or not others:
            self._stranded_look = None
            return
        if self._stranded_look is None:
            self._stranded_look = (now() + self.stranded_look_seconds, None)
            return
        due, before = self._stranded_look
        if now() < due:
            return
        if not all(map(self._idle, others)):  # at work: not asked where (each answer grows its stack file)
            self._stranded_look = (now() + self.stranded_look_seconds, None)
            return
        places = self.where(others)
        seen = {rank: place.summary() for rank, place in places.items() if place.collective}
        if len(seen) == len(others) and seen == before:
            self.outcome.stranded = tuple(sorted(finished))
            self.stop()
            return
        self._stranded_look = (now() + self.stranded_look_seconds, seen)

    def _idle(self, rank: int) -> bool:
        """Whether the rank used (almost) no CPU when last measured; False when it is not measured."""
        usage = self.outcome.usage.get(rank)
        return usage is not None and usage.cpu < IDLE_CPU_PERCENT

    def _not_failed(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        """The ranks worth asking where they are: those not reporting a failure of their own."""
        return tuple(rank for rank in ranks if rank not in self.outcome.failures)

    def _sample_usage(self) -> None:
        self._next_sample = now() + SAMPLE_EVERY
        if self._meter is None:
            self._meter = UsageMeter(self.rank_pids())
        usage = self._meter.sample()
        self.outcome.usage = self._meter.last
        if usage:
            self.sink.usage(usage)

    def _wait_time(self) -> float:
        wait = self.tick_seconds
        if self.deadline is not None and self.outcome.stop_time is None:
            wait = min(wait, max(0.0, self.deadline - now()))
        return wait

    def _count_interrupt(self) -> None:
        self.interrupts += 1

    def _terminate(self, signum: int) -> None:
        """SIGTERM or SIGHUP: stop the ranks as an interrupt does (their own cleanup runs, then
        SIGTERM and SIGKILL), and then let the signal end this process."""
        self.terminated_by = signum
        self.interrupts = max(self.interrupts, 1)


@contextmanager
def interrupts_as_requests(on_interrupt: Callable[[], None], on_termination: Callable[[int], None] | None = None) -> Iterator[None]:
    """While the block runs, Ctrl-C / the notebook's interrupt calls `on_interrupt` (a request to
    stop the ranks) instead of raising, and SIGTERM or SIGHUP (`kill`, a scheduler, a closed
    terminal) calls `on_termination(signum)`; only in the main thread, where signals arrive."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {signal.SIGINT: lambda signum, frame: on_interrupt()}
    if on_termination is not None:
        handlers.update(dict.fromkeys(TERMINATION_SIGNALS, lambda signum, frame: on_termination(signum)))
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
