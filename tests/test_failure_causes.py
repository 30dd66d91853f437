"""Which rank's failure a launch names as the cause, and which other ranks failed by themselves or
were only stopped: what the launcher observed (an Outcome), turned into one RankError."""

from __future__ import annotations

import pytest

from nbfabric.channel import Failure
from nbfabric.launcher.errors import RankError, raise_for_outcome
from nbfabric.launcher.run_loop import Outcome


def _raised(peer: Failure) -> RankError:
    """Rank 0 fails first (t=1.0), which begins the stop (t=1.01); rank 1 fails at t=1.05."""
    outcome = Outcome(
        returncodes={0: 1, 1: 1 if peer.exc_type != "KeyboardInterrupt" else 130},
        exit_times={0: 1.0, 1: 1.1},
        failures={0: Failure(0, "ValueError", "bad batch", "", 1.0, False), 1: peer},
        stop_time=1.01,
        still_running_at_stop=(1,),
        announced={0: 1, 1: 1},
    )
    with pytest.raises(RankError) as caught:
        raise_for_outcome(outcome, None)
    assert caught.value.rank == 0
    return caught.value


def test_a_peer_failing_by_itself_just_after_the_stop_began_is_named_as_failed_not_stopped():
    error = _raised(Failure(1, "EOFError", "no input", "", 1.05, False))
    assert [f.rank for f in error.also_failed] == [1] and error.stopped == []
    assert "then rank 1: EOFError: no input" in str(error)


@pytest.mark.parametrize(
    "consequence",
    [Failure(1, "KeyboardInterrupt", "", "", 1.05, False), Failure(1, "RuntimeError", "Connection reset by peer", "", 1.05, True)],
    ids=["the stop's interrupt", "a collective broken by the failed peer"],
)
def test_a_peer_failing_by_the_stop_is_named_as_stopped(consequence):
    error = _raised(consequence)
    assert error.also_failed == [] and error.stopped == [1]
    assert "stopped: rank 1" in str(error)
