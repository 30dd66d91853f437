"""The exceptions a launch raises in the caller, and which failing rank is the root cause."""

from __future__ import annotations

import signal
from dataclasses import dataclass

from nbfabric.channel import Failure
from nbfabric.launcher.run_loop import Outcome
from nbfabric.launcher.stacks import RankPlace, describe, describe_in_full
from nbfabric.launcher.usage import Usage
from nbfabric.tracebacks import ShortInIPython


VANISHED = "ended with exit status 0 in the middle of the run, without a word (os._exit(0), or a library that called exit())"


@dataclass(frozen=True)
class RankFailure:
    """How one rank ended badly: by an exception, a signal, or a non-zero exit code."""

    rank: int
    time: float
    how: str  # "exception" | "signal" | "exit" | "left" (sys.exit(0) while others went on) | "vanished" (VANISHED) | "unreached" (see below)
    summary: str  # one line, e.g. "ValueError: bad batch" or "killed by SIGKILL"
    traceback: str = ""
    distributed: bool = False


class RankError(ShortInIPython, RuntimeError):
    """A rank failed; the other ranks were stopped. Names the rank that failed first."""

    def __init__(
        self,
        cause: RankFailure,
        also_failed: list[RankFailure],
        stopped: list[int],
        places: dict[int, RankPlace] | None = None,
        usage: dict[int, Usage] | None = None,
    ):
        self.rank = cause.rank
        self.how = cause.how
        self.summary = cause.summary
        self.rank_traceback = cause.traceback
        self.also_failed = also_failed
        self.stopped = stopped
        self.places = places or {}
        self.usage = usage or {}  # each rank's last measured usage
        super().__init__(self._message(cause, also_failed, stopped, self.places, self.usage))

    @staticmethod
    def _message(
        cause: RankFailure, also_failed: list[RankFailure], stopped: list[int], places: dict[int, RankPlace], usage: dict[int, Usage]
    ) -> str:
        lines = [f"rank {cause.rank} failed: {cause.summary}"]
        if also_failed:
            lines.append("then " + "; ".join(f"rank {o.rank}: {o.summary}" for o in also_failed))
        if stopped:
            lines.append(f"stopped: rank {', '.join(map(str, stopped))}")
        failed = {cause.rank, *(failure.rank for failure in also_failed)}
        others = {rank: place for rank, place in places.items() if rank not in failed and not place.failing}
        if others:
            lines.append(f"where the other ranks were: {describe(others)}")
        last = usage.get(cause.rank)
        if cause.how == "signal" and "SIGKILL" in cause.summary:
            measured = f" Rank {cause.rank} used {last.text()} when last measured." if last else ""
            lines.append("A rank killed by SIGKILL has often run out of memory." + measured)
        elif "out of memory" in cause.summary.lower() and last is not None:
            lines.append(f"Rank {cause.rank} used {last.text()} when last measured.")
        if cause.traceback:
            lines += ["", f"Traceback from rank {cause.rank}:", cause.traceback.rstrip()]
        return "\n".join(lines)


class UnreachedCollectiveError(RankError):
    """Ranks waited in a collective that a finished rank will not take part in (a call that not
    every rank makes, or one with tensors of other shapes); every rank was stopped. `rank` is the first rank that waited, `finished` the ranks done."""

    def __init__(self, waiting: list[RankFailure], finished: tuple[int, ...], places: dict[int, RankPlace], usage: dict[int, Usage]):
        self.finished = finished
        super().__init__(waiting[0], waiting[1:], list(finished), places, usage)

    def _message(self, cause, also_failed, stopped, places, usage) -> str:
        done = _ranks(self.finished)
        waiting = "; ".join(f"rank {f.rank} {f.summary}" for f in (cause, *also_failed))
        what = "a collective" if not also_failed else "collectives"
        return (
            f"{waiting}: {what} that {done} will not take part in, having finished the run.\n"
            "Every rank must make the same collective calls in the same order, with tensors of the same "
            "shapes; look at the conditions around this one, or run with --debug to have each call "
            "checked. Every rank was stopped." + _where_they_were(places, "then")
        )


class RankTimeoutError(ShortInIPython, TimeoutError):
    """The run did not finish within its timeout; every rank was stopped. `places`: where the
    ranks still running were at the deadline."""

    def __init__(self, message: str, places: dict[int, RankPlace] | None = None):
        self.places = places or {}
        super().__init__(message)


class ForkUnsafeError(ShortInIPython, RuntimeError):
    """Forking now would hand the ranks a broken CUDA context or process group."""


def rank_failures(outcome: Outcome) -> list[RankFailure]:
    """Every rank that failed, from the exceptions they reported and the exit codes seen."""
    failures = []
    for rank, code in sorted(outcome.returncodes.items()):
        reported, left = outcome.failures.get(rank), outcome.left.get(rank)
        if reported is not None:
            failures.append(_from_report(reported))
        elif left is not None:
            how, ended = ("left", "left the run early") if code == 0 else ("exit", describe_exit(code))
            failures.append(RankFailure(rank, left.time, how, f"{ended}: sys.exit({left.code}) at {left.where}"))
        elif code == 0 and outcome.announced is not None and rank not in outcome.announced:
            failures.append(RankFailure(rank, outcome.exit_times[rank], "vanished", VANISHED))
        elif code < 0:
            failures.append(RankFailure(rank, outcome.exit_times[rank], "signal", describe_exit(code)))
        elif code > 0:
            failures.append(RankFailure(rank, outcome.exit_times[rank], "exit", describe_exit(code)))
    return failures


def root_cause(failures: list[RankFailure], stop_time: float | None) -> RankFailure:
    """The failure that started it all: the earliest, preferring one that torch.distributed
    did not raise (a broken collective is usually a consequence of a peer that died) and
    one that happened before the supervisor began stopping ranks."""
    return min(
        failures, key=lambda f: (stop_time is not None and f.time > stop_time, f.distributed, f.time)
    )


def raise_for_outcome(outcome: Outcome, timeout: float | None, *, result_wanted: bool = False) -> None:
    """Raise the one exception that describes a failed launch; return if every rank succeeded.
    `result_wanted`: rank 0 was to send a value back, so its vanishing is a failure of its own."""
    failures = rank_failures(outcome)
    lost_result = result_wanted and outcome.result is None and any(f.rank == 0 and f.how == "vanished" for f in failures)
    if all(failure.how in ("left", "vanished") for failure in failures) and not lost_result:
        failures = []  # ranks that ended with status 0 (sys.exit(0), os._exit(0)) while no other rank failed: a success
    places = outcome.places
    if outcome.interrupted:
        stopped = KeyboardInterrupt("every rank was stopped" + _where_they_were(places, "then"))
        stopped.places = places  # where the ranks still running were when the stop began
        raise stopped
    if outcome.timed_out:
        running = ", ".join(map(str, outcome.still_running_at_stop)) or "none"
        raise RankTimeoutError(
            f"the run did not finish within timeout={timeout:g} s; every rank was stopped "
            f"(ranks still running at the deadline: {running}). Raise the timeout or look for a hang, "
            "such as a collective that not every rank reaches." + _where_they_were(places, "at the deadline"),
            places,
        )
    if outcome.stranded:
        waiting = [
            RankFailure(rank, outcome.stop_time or 0.0, "unreached", f"waits in {places[rank].summary()}")
            for rank in outcome.still_running_at_stop
            if rank in places and not places[rank].finished
        ]
        if waiting:
            raise UnreachedCollectiveError(waiting, outcome.stranded, places, outcome.usage)
    if failures:
        cause = root_cause(failures, outcome.stop_time)
        stop = outcome.stop_time if outcome.stop_time is not None else float("inf")
        also_failed = [f for f in failures if f is not cause and not _caused_by_stop(f, stop, places)]
        stopped = [rank for rank in outcome.still_running_at_stop if rank != cause.rank and rank not in {f.rank for f in also_failed}]
        raise RankError(cause, also_failed, stopped, places, outcome.usage)


def _caused_by_stop(failure: RankFailure, stop: float, places: dict[int, RankPlace]) -> bool:
    """Whether a rank's failure was the stop's doing: one that came after the stop began and is
    what a stop brings about (the interrupt it sends, a collective broken by a peer that ended),
    unless the rank was reporting a failure of its own already then."""
    if failure.time <= stop or (failure.rank in places and places[failure.rank].failing):
        return False
    return failure.how != "exception" or failure.distributed or failure.summary.startswith("KeyboardInterrupt")


def _ranks(ranks: tuple[int, ...]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _where_they_were(places: dict[int, RankPlace], when: str) -> str:
    return f"\n\nWhere the ranks were {when}:\n{describe_in_full(places)}" if places else ""


def _from_report(failure: Failure) -> RankFailure:
    summary = f"{failure.exc_type}: {failure.message}" if failure.message else failure.exc_type
    return RankFailure(failure.rank, failure.time, "exception", summary, failure.traceback, failure.distributed)


def describe_exit(returncode: int) -> str:
    """How a process ended, in words: "exited with code 1", "killed by SIGKILL"."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"
