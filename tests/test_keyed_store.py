"""The store of a run on several nodes admits only the run's processes: strangers (a plain socket,
torch's own store client, a client with another key) are refused while the run meets and reduces."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from nbfabric import Fabric
from nbfabric.launcher import keyed_store
from nbfabric.launcher.environment import RUN_KEY_ENV
from nbfabric.launcher.keyed_store import MAKE_A_KEY, KeyedStore, KeyedStoreServer, new_run_key
from nbfabric.launcher.launchers import NodePlace
from nbfabric.launcher.machine import free_port
from nbfabric.launcher.output import Sink

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)

KEY = "9b1e4c7d2a6f48e0b3c5d7f9a1e2c4b6"
OTHER_KEY = "0" * 32
ADDRESS = "127.0.0.1"


@pytest.fixture
def server():
    served = KeyedStoreServer(ADDRESS, 0, KEY)
    yield served
    served.close()


def _store(server: KeyedStoreServer, key: str = KEY, seconds: float = 5) -> KeyedStore:
    return KeyedStore(ADDRESS, server.address[1], key, timedelta(seconds=seconds))


def _refuses_strangers(port: int) -> None:
    """A plain socket that cannot prove the key, torch's store client and a client with another key are all refused."""
    with socket.create_connection((ADDRESS, port), timeout=5) as plain:
        assert plain.recv(64).startswith(b"nbfabric-store/1\n")
        plain.sendall(b"GET everything please " * 4)
        assert plain.recv(64) == b""  # dropped
    with pytest.raises(dist.DistError):
        dist.TCPStore(ADDRESS, port, 2, False, timedelta(seconds=1))
    with pytest.raises(dist.DistStoreError, match="refused this process: its run key is not the run's"):
        KeyedStore(ADDRESS, port, OTHER_KEY, timedelta(seconds=5))


# ----------------------------------------------------------------- the store itself
def test_clients_with_the_key_share_keys_counters_and_waits(server):
    first, second = _store(server), _store(server)
    threading.Timer(0.2, second.set, ("address/1", b"host:1")).start()
    assert first.get("address/1") == b"host:1"  # answered once the other client set it
    assert (first.add("n", 2), second.add("n", 3)) == (2, 5)
    assert first.compare_set("c", b"", b"one") == b"one" and second.compare_set("c", b"x", b"two") == b"one"
    assert second.check(["n", "c"]) and not second.check(["absent"])
    with pytest.raises(dist.DistStoreError, match="did not answer"):
        first.wait(["never set"], timedelta(seconds=0.2))


def test_strangers_are_refused_and_the_run_goes_on(server):
    member = _store(server)
    _refuses_strangers(server.address[1])
    member.set("still", b"served")
    assert _store(server).get("still") == b"served"


def test_a_client_that_says_nothing_is_dropped(server, monkeypatch):
    monkeypatch.setattr(keyed_store, "HANDSHAKE_SECONDS", 0.3)
    with socket.create_connection((ADDRESS, server.address[1]), timeout=5) as silent:
        silent.recv(64)
        started = time.monotonic()
        assert silent.recv(64) == b""
    assert time.monotonic() - started < 3


def test_a_client_refuses_a_server_that_does_not_know_the_key():
    impostor = KeyedStoreServer(ADDRESS, 0, OTHER_KEY)
    try:
        with pytest.raises(dist.DistStoreError, match="refused this process"):
            _store(impostor)  # the impostor drops it first; were it to answer, its proof would not match
    finally:
        impostor.close()


def test_it_listens_on_the_given_address_only_and_closes():
    served = KeyedStoreServer(ADDRESS, 0, KEY)
    port = served.address[1]
    listening = [c.laddr for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    served.close()
    assert listening == [(ADDRESS, port)]
    assert not [c for c in psutil.Process().net_connections("inet") if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN]
    assert "nbfabric-run-store" not in [thread.name for thread in threading.enumerate()]


def test_an_address_of_another_machine_is_refused_saying_what_to_change():
    with pytest.raises(OSError, match="the main address must be an address of node 0 .* --main-address and --main-port"):
        KeyedStoreServer("192.0.2.1", 0, KEY)  # TEST-NET-1: never this machine's


# ----------------------------------------------------------------- runs
TWO_NODES = """
from nbfabric import Fabric
fabric = Fabric()
fabric.launch()
total = fabric.all_reduce(fabric.global_rank + 1, reduce_op="sum")
print("rank", fabric.global_rank, "of", fabric.world_size, "sum", int(total))
"""


def _listening(root: int, port: int) -> list[str]:
    """The addresses that `root` or a process under it listens on at `port`."""
    found = []
    for process in [psutil.Process(root), *psutil.Process(root).children(recursive=True)]:
        try:
            found += [c.laddr.ip for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        except psutil.NoSuchProcess:
            pass
    return found


def _end(processes: list[subprocess.Popen]) -> None:
    """Kill what is left of `processes` and close their pipes, also when a test fails half way."""
    for process in processes:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


def _two_nodes(tmp_path: Path, source: str, while_node_0_waits=lambda port: None) -> list[tuple[str, str]]:
    """`nbfabric run` on two nodes of this machine, one CPU rank each; (stdout, stderr) of each node."""
    script = tmp_path / "train.py"
    script.write_text(source)
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("NBFABRIC_")}
    env.update({"NBFABRIC_CONFIG": str(tmp_path / "none.json"), RUN_KEY_ENV: KEY})
    flags = ["--accelerator=cpu", "--devices=1", "--num-nodes=2", f"--main-address={ADDRESS}", f"--main-port={port}", "--timeout=90"]
    nodes = []
    try:
        for node in (0, 1):
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "nbfabric", "run", *flags, f"--node-rank={node}", str(script)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
            if node == 0:  # node 0 waits for node 1 meanwhile: strangers try their luck
                deadline = time.monotonic() + 30
                while not _listening(nodes[0].pid, port) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert _listening(nodes[0].pid, port) == [ADDRESS]  # the main address only, not every interface
                while_node_0_waits(port)
        outputs = [node.communicate(timeout=90) for node in nodes]
    finally:
        _end(nodes)
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err
    return outputs


def test_nbfabric_run_on_two_nodes_refuses_strangers_and_reduces_over_gloo(tmp_path):
    outputs = _two_nodes(tmp_path, TWO_NODES, while_node_0_waits=_refuses_strangers)
    assert outputs[0][0] == "[rank 0] rank 0 of 2 sum 3\n" and outputs[1][0] == "[rank 1] rank 1 of 2 sum 3\n"


TORCHRUN_STYLE = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor(dist.get_rank() + 1.0)
dist.all_reduce(total)
print("sum", int(total))
dist.destroy_process_group()
"""


def test_a_script_that_makes_its_own_process_group_meets_through_the_keyed_store_too(tmp_path):
    outputs = _two_nodes(tmp_path, TORCHRUN_STYLE)  # torch's own store would listen on every interface
    assert [out for out, _ in outputs] == ["[rank 0] sum 3\n", "[rank 1] sum 3\n"]


POOL_RANK = """
import os, sys
import psutil
import torch.distributed as dist
from datetime import timedelta
from nbfabric import Fabric
from nbfabric.launcher.keyed_store import KeyedStore
fabric = Fabric(accelerator="cpu")
fabric.launch()
total = fabric.all_reduce(fabric.global_rank + 1, reduce_op="sum")
port = int(os.environ["MASTER_PORT"])
if fabric.global_rank == 0:
    listens = [c.laddr.ip for c in psutil.Process().net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port]
    print("sum", int(total), "store listens on", listens)
else:
    try:
        KeyedStore("127.0.0.1", port, "f" * 32, timedelta(seconds=5))
    except dist.DistStoreError as error:
        print("sum", int(total), "another key:", "refused" if "refused" in str(error) else error)
fabric.barrier()
"""


def test_ranks_whose_environment_holds_the_key_meet_through_the_keyed_store(tmp_path):
    """As a pool's engines join: torchrun's variables and the key set, no launcher links; the strategy
    then meets through the keyed store, which rank 0 serves on MASTER_ADDR only."""
    script = tmp_path / "rank.py"
    script.write_text(POOL_RANK)
    common = {name: value for name, value in os.environ.items() if not name.startswith("NBFABRIC_")}
    common.update({
        "MASTER_ADDR": ADDRESS, "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
        "GLOO_SOCKET_IFNAME": "lo", RUN_KEY_ENV: new_run_key(), "NBFABRIC_CONFIG": str(tmp_path / "none.json"),
    })
    ranks = []
    try:
        for rank in (0, 1):
            env = {**common, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            ranks.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [rank.communicate(timeout=90) for rank in ranks]
    finally:
        _end(ranks)
    assert [rank.returncode for rank in ranks] == [0, 0], [err for _, err in outputs]
    assert outputs[0][0] == f"sum 3 store listens on ['{ADDRESS}']\n"
    assert outputs[1][0] == "sum 3 another key: refused\n"


def _never_runs(fabric):
    Path(os.environ["NBFABRIC_TEST_MARK"]).write_text("ran")


def test_several_nodes_without_a_key_are_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_KEY_ENV, raising=False)
    monkeypatch.setenv("NBFABRIC_TEST_MARK", str(tmp_path / "ran"))
    fabric = Fabric(accelerator="cpu", devices=1, num_nodes=2)
    with pytest.raises(ValueError, match=f"num_nodes=2 needs a run key.*`{re.escape(MAKE_A_KEY)}`.*--run-key=KEY or .*{RUN_KEY_ENV}"):
        fabric._launch(_never_runs, sink=Sink(), place=NodePlace(0, ADDRESS, free_port()))
    assert not psutil.Process().children() and not (tmp_path / "ran").exists()
