"""The store ranks of one machine meet through, kept by the supervisor: its semantics, and its use
by torch.distributed in real ranks."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from nbfabric import Fabric
from nbfabric.launcher.rendezvous import StoreServer

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)


class Answers:
    """Collects what the server answers, as (rank, request_id, value)."""

    def __init__(self):
        self.got: list[tuple[int, int, object]] = []

    def to(self, rank: int):
        return lambda request_id, value: self.got.append((rank, request_id, value))


def test_get_and_wait_are_answered_when_another_rank_sets_the_keys():
    server, answers = StoreServer(), Answers()
    server.handle(0, (1, "get", ("address/1",)), answers.to(0))
    server.handle(0, (2, "wait", (["a", "b"],)), answers.to(0))
    assert answers.got == []
    server.handle(1, (7, "set", ("address/1", b"host:1")), answers.to(1))
    server.handle(1, (8, "set", ("a", b"")), answers.to(1))
    assert answers.got == [(1, 7, None), (0, 1, b"host:1"), (1, 8, None)]
    server.handle(1, (9, "set", ("b", b"x")), answers.to(1))
    assert answers.got[-2:] == [(1, 9, None), (0, 2, None)]


def test_counters_compare_and_set_and_key_queries():
    server, answers = StoreServer(), Answers()
    reply = answers.to(0)
    for request_id, request in enumerate([
        ("add", ("n", 2)), ("add", ("n", 3)),
        ("compare_set", ("c", b"", b"first")), ("compare_set", ("c", b"wrong", b"second")),
        ("compare_set", ("c", b"first", b"third")), ("compare_set", ("absent", b"x", b"y")),
        ("check", (["n", "c"],)), ("check", (["n", "nope"],)),
        ("num_keys", ()), ("delete_key", ("n",)), ("delete_key", ("n",)), ("get", ("n",)),
    ]):
        server.handle(0, (request_id, *request), reply)
    values = [value for _, _, value in answers.got]
    assert values == [2, 5, b"first", b"first", b"third", b"x", True, False, 2, True, False]  # the get still waits


def test_a_rank_that_is_gone_stops_waiting():
    server, answers = StoreServer(), Answers()
    server.handle(1, (1, "get", ("k",)), answers.to(1))
    server.forget(1)
    server.handle(0, (1, "set", ("k", b"v")), answers.to(0))
    assert answers.got == [(0, 1, None)]


def _use_the_store(fabric):
    store = dist.distributed_c10d._get_default_store()
    store.add("arrived", 1)
    fabric.barrier()
    pair = dist.new_group([0, 1])  # a second gloo group meets through the same store
    total = torch.tensor(float(fabric.global_rank + 1))
    dist.all_reduce(total, group=pair)
    with pytest.raises(dist.DistStoreError, match="did not answer"):
        store.wait(["never set"], timedelta(seconds=0.2))
    return int(store.add("arrived", 0)), total.item()


def test_ranks_meet_through_the_launcher_store_for_groups_counters_and_timeouts(no_leaks):
    assert Fabric(accelerator="cpu", devices=2).launch(_use_the_store) == (2, 3.0)


def _sum_of_ones(fabric):
    return int(fabric.all_reduce(torch.tensor(1.0), reduce_op="sum"))


def test_spawned_ranks_meet_through_it_too(no_leaks):
    assert Fabric(accelerator="cpu", devices=2, start_method="spawn").launch(_sum_of_ones) == 2


def _listening(pids) -> set:
    import psutil

    return {c.laddr for pid in pids for c in psutil.Process(pid).net_connections("all") if c.status == psutil.CONN_LISTEN}


def _listening_while_meeting():
    """In a rank: meet through the store, then the listening sockets of this rank and of its launcher."""
    import os
    import socket

    from nbfabric.launcher.rank_links import rank_links

    store = rank_links().store
    store.set(f"here/{os.environ['RANK']}", b"")
    store.wait(["here/0", "here/1"])
    return store._socket.family == socket.AF_UNIX, _listening((os.getpid(), os.getppid()))


def test_the_one_machine_store_listens_on_no_port(no_leaks):
    """It needs no key: a rank reaches it only over the socket pair it inherited. (Sockets this test
    process listened on before, from earlier tests, are not the launcher's.)"""
    import os

    from nbfabric.launcher import launch

    before = _listening([os.getpid()])
    over_a_socket_pair, listening = launch(_listening_while_meeting, nprocs=2)
    assert over_a_socket_pair and listening - before == set()
