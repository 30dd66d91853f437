"""Where the ranks of a running run are, asked from the notebook (`%fabric where`, the Where
button) and answered by the run's loop at its next tick."""

from __future__ import annotations

import threading

from nbfabric.launcher.stacks import describe_in_full


class WhereRequests:
    """A view's requests for where its run's ranks are, and the last answer."""

    def __init__(self):
        self._asked = False
        self._answered = threading.Event()
        self.places: dict = {}

    def ask(self) -> None:
        """Ask; the run's loop answers at its next tick (`answer`)."""
        self._answered.clear()
        self._asked = True

    def wait(self, timeout: float) -> dict | None:
        """The answer to the last request (rank -> stacks.RankPlace), or None if none came in time."""
        return self.places if self._answered.wait(timeout) else None

    def take(self) -> bool:
        """For the run's loop: whether a request is waiting (it is then taken)."""
        asked, self._asked = self._asked, False
        return asked

    def answer(self, places: dict) -> None:
        self.places = places
        self._answered.set()


def places_text(places: dict | None, label: str) -> str:
    """What `%fabric where` prints for a run."""
    if places is None:
        return f"the run {label} did not answer within a few seconds; it may be ending"
    if not places:
        return f"no rank of the run {label} is running"
    return f"where the ranks of the run {label} are:\n{describe_in_full(places)}"
