"""Run a function on a rank pool's engines: their output and events go to the run's Sink, and a
failure, interrupt or timeout ends as for ranks started per run, with the pool still usable."""

from __future__ import annotations

import pickle
import signal
import sys
import time
from concurrent import futures
from typing import Any, Callable

from nbfabric.channel import Display, Failure, Metrics, now
from nbfabric.launcher.cell_labels import label_error_cells
from nbfabric.launcher.errors import describe_exit, raise_for_outcome
from nbfabric.launcher.output import LineSplitter, Sink, TextSink, emit_segments
from nbfabric.launcher.run_loop import RunLoop
from nbfabric.launcher.stacks import WHERE_SIGNAL, RankPlace, parse
from nbfabric.pool import engine_side
from nbfabric.pool.cluster import EngineCluster

STOP_GRACE = 3.0  # seconds ranks get to stop after SIGINT, and again after their peers left the group
_DEAD_CHECK = 0.5  # seconds between two looks for engines that are gone
LAST_OUTPUT_WAIT = 0.3  # seconds the output of the other ranks has to arrive when a lost rank ends the pool


class PoolLauncher:
    """Runs a rank callable (pickled: see nbfabric.rank_call) on every rank of `pool`; returns rank 0's value."""

    ranks_stay = True  # what the ranks set up (models, optimizers) stays there for the next run

    def __init__(self, pool: EngineCluster, *, timeout: float | None = None, sink: Sink | None = None):
        self.pool = pool
        self.timeout = timeout
        self.sink = sink or TextSink()

    def launch(self, rank_main: Callable[[], Any], *, prepare: Callable[[], None] | None = None) -> Any:
        self.pool.check_usable()
        payload = pickle.dumps(rank_main, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            outcome = _PoolRun(self.pool, self.sink, self.timeout, payload).run()
            raise_for_outcome(outcome, self.timeout)
        except BaseException as error:
            label_error_cells(error)
            raise
        return pickle.loads(outcome.result) if outcome.result is not None else None

    def continue_script(self, *, prepare: Callable[[], None] | None = None) -> None:
        raise ValueError("a rank pool runs a function: fabric.launch(fn), pool.launch(fn) or a %%fabric cell")


class _PoolRun(RunLoop):
    """One run on the pool: replays the ranks' events as they arrive and watches for the end."""

    tick_seconds = 0.05

    def __init__(self, pool: EngineCluster, sink: Sink, timeout: float | None, payload: bytes):
        super().__init__(sink, timeout)
        self.pool, self.payload = pool, payload
        self.pending: dict[int, Any] = {}
        self.request: Any = None  # the one request to every rank's engine
        self.data: dict[int, dict] = {}  # each rank's events, as the client receives them
        self.splitters: dict[tuple[int, str], LineSplitter] = {}
        self.sequence: dict[int, int] = {}
        self._left_group = False
        self._next_dead_check = 0.0
        self._stacks: dict[int, str] = {}  # the last stack each rank sent

    def start(self) -> None:
        after_stop = self.pool.last_run_stopped
        engines = self.pool.client[[r.engine for r in self.pool.ranks]]  # in rank order
        self.request = engines.apply_async(engine_side.run, self.payload, after_stop)
        # one request for all ranks (as %%px sends), followed rank by rank: its per-engine parts
        self.pending = dict(enumerate(self.request._children))
        self.data = {rank: metadata["data"] for rank, metadata in enumerate(self.request._metadata)}
        self.sequence = dict.fromkeys(self.pending, 0)

    def done(self) -> bool:
        return not self.pending

    def running_ranks(self) -> tuple[int, ...]:
        return tuple(sorted(self.pending))

    def finished_ranks(self) -> tuple[int, ...]:
        return tuple(rank for rank, code in self.outcome.returncodes.items() if code == 0)

    def poll(self, wait: float) -> None:
        futures.wait([next(iter(self.pending.values()))], timeout=wait)
        for rank, request in list(self.pending.items()):
            if request.done() and self.pending.pop(rank, None) is not None:  # a lost rank ends the pool, clearing the rest
                self._finished(rank, request)
        for rank in self.data:
            self._replay(rank)
        if self.pending and now() >= self._next_dead_check:
            self._next_dead_check = now() + _DEAD_CHECK
            self._look_for_dead_ranks()

    def end(self) -> None:
        self._drain_final()
        self.pool.last_run_stopped = (  # a rank that left by sys.exit(0) skipped the rest of the cell: the ranks may differ
            self.outcome.stop_time is not None or bool(self.outcome.failures) or bool(self.outcome.left) or any(self.outcome.returncodes.values())
        )
        if self._left_group and not self.pool.broken:
            self.pool.regroup()
            print("the ranks left their process group to stop; the next run meets in a new one, and what was set up before goes on there", file=sys.stderr)

    def _finished(self, rank: int, result: futures.Future) -> None:
        from ipyparallel.error import EngineError

        try:
            answer = result.result(0)  # an error the engine reported arrives as its value
            if isinstance(answer, Exception):
                raise answer
            status, value = answer
        except Exception as error:  # noqa: BLE001 - the engine is gone, or could not run the rank's side
            if isinstance(error, EngineError) or getattr(error, "ename", "") == "EngineError":
                self._lost(rank, self._engine_ended(rank))  # ipyparallel's words would name its task, not the process
                return
            status, value = "failed", Failure(rank, getattr(error, "ename", type(error).__name__), str(getattr(error, "evalue", error)), "", now(), False)
        if status == "done":
            self.outcome.returncodes[rank] = 0
            if value is not None:
                self.outcome.result = value
        elif status == "left":
            self.outcome.returncodes[rank] = 0
            self._rank_left(value)
        else:
            self.outcome.failures.setdefault(rank, value)
            self.outcome.returncodes[rank] = 130 if value.exc_type == "KeyboardInterrupt" else 1
            self.stop()
        self.outcome.exit_times[rank] = now()
        self.sink.rank_exited(rank, self.outcome.returncodes[rank])

    def _look_for_dead_ranks(self) -> None:
        """Every running rank is lost when the pool's Slurm job ended or its controller (through
        which their results come) is gone; else those whose engine is gone."""
        controller = self.pool.controller_gone()
        ended = self.pool.job_ended() or controller
        dead = sorted(self.pending) if ended else [rank for rank in self.pool.dead_ranks() if rank in self.pending]
        for rank in dead:
            self._lost(rank, ended or self._engine_ended(rank), pool_lost=controller)

    def _engine_ended(self, rank: int) -> str:
        """"its engine (pid 7 on n1) was killed by SIGSEGV while the run went on" ("exited with
        code 3"; "died" where how is not known)."""
        place, code = self.pool.ranks[rank], self.pool.exit_status(rank)
        how = "died" if code is None else describe_exit(code)
        return f"its engine (pid {place.pid} on {place.node}) {'was ' if how.startswith('killed') else ''}{how} while the run went on"

    def _lost(self, rank: int, why: str, pool_lost: str = "") -> None:
        """The rank's engine is gone (`why`), or, `pool_lost`, the whole pool (its controller)."""
        self.pending.pop(rank, None)  # the first loss ends the pool, which clears the rest
        # It died before a peer's collective broke on it, however late it is noticed: the cause.
        died = min([now(), *(f.time for f in self.outcome.failures.values() if f.distributed)])
        self.outcome.failures.setdefault(rank, Failure(rank, "engine lost", why, "", died, False))
        self.outcome.returncodes[rank] = 1
        self.outcome.exit_times[rank] = now()
        self.sink.rank_exited(rank, 1)
        if not self.pool.broken:
            self._end_pool(pool_lost or f"rank {rank}'s engine is gone ({why})")

    def rank_pids(self) -> dict[int, int]:
        return {place.rank: place.pid for place in self.pool.ranks if place.here}

    def where(self, ranks: tuple[int, ...], wait: float = 1.5) -> dict[int, RankPlace]:
        """Ask these ranks' engines for their stacks (a signal, as for an interrupt) and wait for the answers."""
        if self.pool.broken:
            return {}
        for rank in ranks:
            self._stacks.pop(rank, None)
        self.pool.signal(ranks, WHERE_SIGNAL)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not all(rank in self._stacks for rank in ranks):
            time.sleep(0.02)
            for rank in ranks:
                self._replay(rank)
        return {rank: parse(self._stacks[rank], rank) if rank in self._stacks else RankPlace(rank, missing="it did not answer") for rank in ranks}

    def stop_ranks(self) -> None:
        """SIGINT to the engines of the ranks still running (see `escalate` for the rest)."""
        if self.pending and not self.pool.broken:
            self.pool.signal(list(self.pending), signal.SIGINT)

    def escalate(self, waited: float, impatient: bool) -> None:
        """Ranks that do not stop are mostly waiting in a collective, for a peer that left it or in
        one their peers never make: the stopped ranks leave the process group, and the others (on
        this machine) break the collective they wait in (engine_side.LEAVE_SIGNAL), which fails it
        on every rank (at once on a second interrupt); if that does not end them either, the pool
        ends. A second interrupt hurries the stop, not the pool's end: the pool holds the models set
        up on it."""
        if not self.pending or self.pool.broken:
            return
        if not self._left_group and (waited >= STOP_GRACE or impatient):
            self._left_group = True
            idle = [self.pool.ranks[r].engine for r in range(len(self.pool.ranks)) if r not in self.pending]
            if idle:
                self.pool.client[idle].apply_sync(engine_side.leave_group)
            # engines here only: elsewhere the signal would reach their launcher's processes too
            self.pool.signal([rank for rank in sorted(self.pending) if self.pool.ranks[rank].here], engine_side.LEAVE_SIGNAL)
        if waited >= 2 * STOP_GRACE:
            stuck = sorted(self.pending)
            self.pending.clear()
            self._end_pool(f"{'ranks' if len(stuck) > 1 else 'rank'} {', '.join(map(str, stuck))} did not stop within {2 * STOP_GRACE:g} s")

    def _end_pool(self, why: str) -> None:
        """Before the engines here are killed, what the others sent is let arrive and shown (their
        output reaches the notebook in batches, 20 ms apart)."""
        deadline = time.monotonic() + LAST_OUTPUT_WAIT
        while time.monotonic() < deadline:
            time.sleep(0.02)
            for rank in self.data:
                self._replay(rank)
        print(f"the rank pool was ended: {why}; %fabric start makes a new one", file=sys.stderr)
        stopped = [rank for rank in self.pending if rank not in self.outcome.failures]  # ended with the pool, as a stop ends them
        self.outcome.still_running_at_stop = tuple(sorted({*self.outcome.still_running_at_stop, *stopped}))
        self.pending.clear()
        self.pool.mark_broken(why)

    def _replay(self, rank: int) -> None:
        """Pass on, in order, the batches of events rank `rank` published so far. The messages of one
        engine arrive in order, so a later one that came before the next expected one means that one
        was lost on the way: that is said, in the rank's stderr, and the replay goes on after it."""
        data = self.data[rank]  # the very dict the client fills as messages arrive
        while True:
            key = str(self.sequence[rank])
            if key not in data:
                later = [int(other) for other in list(data) if other.isdigit() and int(other) > self.sequence[rank]]
                if not later:
                    return
                following = min(later)
                self.sink.line(rank, "stderr", f"(nbfabric: {following - self.sequence[rank]} message(s) of this rank's output and metrics were lost on the way from its engine)")
                self.sequence[rank] = following
                continue
            batch = data.pop(key)
            self.sequence[rank] += 1
            for event in batch:
                self._replay_event(rank, event)

    def _replay_event(self, rank: int, event: Any) -> None:
        if isinstance(event, Metrics):
            self.sink.metrics(event)
        elif isinstance(event, Display):
            self.sink.display(event)
        elif event[0] == "stacks":
            self._stacks[rank] = event[1]
        else:
            _, stream, text = event
            splitter = self.splitters.setdefault((rank, stream), LineSplitter())
            emit_segments(self.sink, rank, stream, splitter.feed(text.encode()))

    def _drain_final(self) -> None:
        """The events that arrived after the runs' results, and each stream's unterminated rest."""
        if not self.pool.broken and self.request is not None:
            try:
                self.request.wait_for_output(2.0)
            except Exception:  # noqa: BLE001 - a lost engine sends nothing more
                pass
        for rank in self.data:
            self._replay(rank)
        for (rank, stream), splitter in self.splitters.items():
            emit_segments(self.sink, rank, stream, splitter.close())
        self.sink.flush()
