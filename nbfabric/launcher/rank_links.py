"""What ties a process that nbfabric started as a rank to its launcher: the event channel, and
the socket to the supervisor's rendezvous store (ranks of one machine)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from nbfabric.channel import ChannelWriter
from nbfabric.launcher.store_client import SupervisorStore


@dataclass
class RankLinks:
    channel: ChannelWriter
    store_fd: int | None = None
    after_stop: bool = False  # the rank's previous run (a pool's) was stopped or failed
    pid: int = field(default_factory=os.getpid)
    _store: SupervisorStore | None = field(default=None, repr=False)

    @property
    def store(self) -> SupervisorStore | None:
        """The supervisor's store, made once and kept for the life of the process: torch.distributed
        holds only its C++ half, which needs the Python object to answer calls."""
        if self.store_fd is not None and self._store is None:
            self._store = SupervisorStore(self.store_fd)
        return self._store


_this_process: RankLinks | None = None  # per process: a rank has one set of links to its launcher


def set_rank_links(links: RankLinks | None) -> None:
    """In a new rank: its links (see worker.become_rank)."""
    global _this_process
    _this_process = links


def rank_links() -> RankLinks | None:
    """This process's links, if nbfabric started it as a rank (not in a process it forked in turn)."""
    links = _this_process
    return links if links is not None and links.pid == os.getpid() else None
