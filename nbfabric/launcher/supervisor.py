"""Watch rank processes started here: forward their output and events, stop them all when one fails or time runs out."""

from __future__ import annotations

import os
import selectors
import signal
from functools import partial

from nbfabric.channel import ChannelWriter, Display, Exiting, Failure, FrameReader, Left, Metrics, Result, now
from nbfabric.launcher.output import LineSplitter, Sink, emit_segments
from nbfabric.launcher.processes import RankProcess, reap_in_background
from nbfabric.launcher.rendezvous import StoreServer, finished_key
from nbfabric.launcher.run_loop import RunLoop
from nbfabric.launcher.stacks import RankPlace, take

# After a stop request: SIGINT at once, SIGTERM after STOP_LADDER[1] s, SIGKILL after STOP_LADDER[2] s.
STOP_LADDER = ((0.0, signal.SIGINT), (0.8, signal.SIGTERM), (1.5, signal.SIGKILL))
# How long to wait for the output pipes of exited ranks, should a grandchild still hold them.
DRAIN_SECONDS = 2.0


class Supervisor(RunLoop):
    """Watches the processes of one launch until every rank has ended and its output is drained.

    A rank has ended once it exited, or once it announced its exit code and closed its pipes; such
    a rank is reaped in the background, so the caller does not wait for the teardown of its memory."""

    def __init__(self, ranks: list[RankProcess], sink: Sink, timeout: float | None = None):
        super().__init__(sink, timeout)
        self.ranks = {process.rank: process for process in ranks}
        self.store = StoreServer()  # for the ranks that have a socket to it (those of one machine)
        self._selector = selectors.DefaultSelector()
        self._stop_signals_sent = 0
        self._drain_deadline: float | None = None
        self._open_pipes = {p.rank: {p.stdout, p.stderr, p.channel} for p in ranks}
        self._announced: dict[int, int] = {}  # rank -> exit code it announced
        self._holding: list[int] = []  # store sockets of ranks that announced their end, closed to let them go
        self.outcome.announced = self._announced

    def start(self) -> None:
        for process in self.ranks.values():
            self._watch(process)

    def done(self) -> bool:
        return not self._selector.get_map()

    def running_ranks(self) -> tuple[int, ...]:
        return tuple(r for r in self.ranks if r not in self.outcome.returncodes)

    def finished_ranks(self) -> tuple[int, ...]:
        return tuple(rank for rank in self.ranks if finished_key(rank) in self.store.data)

    def rank_pids(self) -> dict[int, int]:
        return {rank: process.pid for rank, process in self.ranks.items()}

    def where(self, ranks: tuple[int, ...]) -> dict[int, RankPlace]:
        return take({rank: (self.ranks[rank].pid, self.ranks[rank].stacks) for rank in ranks})

    def end(self) -> None:
        self._abandon()
        self._selector.close()
        for process in self.ranks.values():
            process.stacks.close()
        self.sink.close()

    def _watch(self, process: RankProcess) -> None:
        for fd, kind in ((process.stdout, "stdout"), (process.stderr, "stderr")):
            self._selector.register(fd, selectors.EVENT_READ, (process.rank, kind, LineSplitter()))
        self._selector.register(process.channel, selectors.EVENT_READ, (process.rank, "channel", FrameReader()))
        self._selector.register(process.sentinel, selectors.EVENT_READ, (process.rank, "exit", None))
        if process.store is not None:
            self._selector.register(process.store, selectors.EVENT_READ, (process.rank, "store", FrameReader()))

    def poll(self, wait: float) -> None:
        for key, _ in self._selector.select(wait):
            if key.fd not in self._selector.get_map():
                continue  # a rank that ended earlier in this batch took its sentinel with it
            rank, kind, reader = key.data
            if kind == "exit":
                self._selector.unregister(key.fd)
                self._ended(rank, self.ranks[rank].reap())
            else:
                self._read(key.fd, rank, kind, reader)
        if self._drain_deadline is not None and now() >= self._drain_deadline:
            self._abandon()

    def _read(self, fd: int, rank: int, kind: str, reader) -> None:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return
        if not chunk:
            self._selector.unregister(fd)
            os.close(fd)
            if kind == "store":
                self.store.rank_ended(rank)
                return
            if kind != "channel":
                emit_segments(self.sink, rank, kind, reader.close())
            self._open_pipes[rank].discard(fd)
            if rank in self._announced and not self._open_pipes[rank] and rank not in self.outcome.returncodes:
                self._selector.unregister(self.ranks[rank].sentinel)
                self._ended(rank, self._announced[rank])
            return
        if kind == "channel":
            for event in reader.feed(chunk):
                self._on_event(event)
        elif kind == "store":
            for request in reader.feed(chunk):
                self.store.handle(rank, request, partial(_answer, ChannelWriter(fd)))
        else:
            emit_segments(self.sink, rank, kind, reader.feed(chunk))

    def _on_event(self, event) -> None:
        if isinstance(event, Metrics):
            self.sink.metrics(event)
        elif isinstance(event, Display):
            self.sink.display(event)
        elif isinstance(event, Result):
            self.outcome.result = event
        elif isinstance(event, Failure):
            self.outcome.failures.setdefault(event.rank, event)
            self.stop()
        elif isinstance(event, Left):
            self._rank_left(event)
        elif isinstance(event, Exiting):
            self._announced[event.rank] = event.code

    def _ended(self, rank: int, code: int) -> None:
        store = self.ranks[rank].store
        if store is not None and store in self._selector.get_map():  # its children may still hold the socket
            self._selector.unregister(store)
            if rank in self._announced:
                self._holding.append(store)  # the rank stays until it is let go (worker._stay_until_let_go)
            else:
                os.close(store)
        self.store.rank_ended(rank)
        self.outcome.returncodes[rank] = code
        self.outcome.exit_times[rank] = now()
        self.sink.rank_exited(rank, code)
        if code != 0:
            self.stop()
        if len(self.outcome.returncodes) == len(self.ranks):
            self._drain_deadline = now() + DRAIN_SECONDS

    def escalate(self, waited: float, impatient: bool) -> None:
        """SIGINT at once, then SIGTERM and SIGKILL (STOP_LADDER); all at once on a second interrupt.
        A rank still starting (an interpreter importing, before it listens for where-requests) has
        nothing to stop gracefully and would print the interrupt's traceback: it gets SIGKILL."""
        due = len(STOP_LADDER) if impatient else sum(1 for delay, _ in STOP_LADDER if waited >= delay)
        while self._stop_signals_sent < due:
            _, sig = STOP_LADDER[self._stop_signals_sent]
            for process in self.ranks.values():
                process.signal(sig if process.stacks.size() else signal.SIGKILL)
            self._stop_signals_sent += 1

    def _abandon(self) -> None:
        """Kill whatever still runs, reap it, and close every pipe (used when done or on error)."""
        exiting = []
        for process in self.ranks.values():
            if process.returncode is not None:
                continue
            if process.rank in self.outcome.returncodes and process.rank in self._announced:
                exiting.append(process)
                continue
            process.signal(signal.SIGKILL)
            process.reap()
            self.outcome.returncodes[process.rank] = process.returncode
            self.outcome.exit_times[process.rank] = now()
        reap_in_background(exiting, self._holding)
        self._holding = []
        for key in list(self._selector.get_map().values()):
            self._selector.unregister(key.fd)
            if key.data[1] != "exit":
                os.close(key.fd)


def _answer(rank_socket: ChannelWriter, request_id: int, value) -> None:
    try:
        rank_socket.send((request_id, value))
    except OSError:  # the rank is gone
        pass
