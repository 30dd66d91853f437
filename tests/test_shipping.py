"""Notebook values sent to spawned ranks: exact, each rank's own copy, large ones through shared
memory (written while the ranks start, waited for by each) that nothing leaves behind, through pipes
when /dev/shm lacks room, and a clear error in the ranks when writing it fails."""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import pickle
import signal
import threading
import time
from functools import partial

import cloudpickle
import numpy as np
import pytest
import torch

import nbfabric.launcher
from nbfabric import launch
from nbfabric.launcher import shared_tensors
from nbfabric.launcher.errors import RankError, RankTimeoutError
from nbfabric.launcher.output import Sink
from nbfabric.launcher.shared_tensors import LARGE, SHM_DIR, NotDelivered, SharedFiles
from nbfabric.launcher.shipping import ship
from test_magic import Kernel

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)

MB = 1 << 20


def shm_files(pid: int | None = None) -> list[str]:
    return sorted(glob.glob(os.path.join(SHM_DIR, f"nbfabric-ship-{pid or os.getpid()}-*")))


def notebook_values() -> dict:
    torch.manual_seed(0)
    big = torch.randn(1024, 1024)  # 4 MB
    leaf = torch.randn(512, 1024, requires_grad=True)
    model = torch.nn.Linear(1024, 512)
    ro = np.arange(300_000, dtype=np.float64)
    ro.flags.writeable = False
    values = {
        "big": big,
        "rows": big[10:20],  # a view: the same storage in the notebook
        "transposed": big.t(),
        "leaf": leaf,
        "param": torch.nn.Parameter(torch.randn(700, 700)),
        "model": model,
        "weight": model.weight,  # the module's own parameter, under a second name
        "half": big.half(),
        "ints": torch.arange(600_000),
        "sparse": torch.randn(1000, 1000).relu().to_sparse(),
        "small": torch.arange(5.0),
        "array": np.random.default_rng(0).random((600, 700)),
        "fortran": np.asfortranarray(np.random.default_rng(1).random((600, 500))),
        "readonly": ro,
        "strided": np.arange(600_000, dtype=np.float32)[::3],  # not contiguous: inside the pickle, as numpy pickles it
        "tiny": np.arange(4),
    }
    return values


def assert_same(sent, got) -> None:
    """`got` is what cloudpickle gives for `sent`, exactly (type, layout, flags, values), and a copy of its own."""
    expected = cloudpickle.loads(cloudpickle.dumps(sent))
    assert type(got) is type(expected)
    if isinstance(sent, torch.nn.Module):
        for a, b in zip(sent.parameters(), got.parameters()):
            assert_same(a, b)
        return
    if isinstance(sent, np.ndarray):
        assert (got.dtype, got.shape, got.strides) == (expected.dtype, expected.shape, expected.strides)
        assert (got.flags.c_contiguous, got.flags.f_contiguous, got.flags.writeable) == (
            expected.flags.c_contiguous, expected.flags.f_contiguous, expected.flags.writeable)
        assert np.array_equal(got, sent) and not np.shares_memory(got, sent)
        return
    assert (got.dtype, got.shape, got.layout, got.requires_grad, got.is_leaf) == (
        expected.dtype, expected.shape, expected.layout, expected.requires_grad, expected.is_leaf)
    if sent.layout == torch.sparse_coo:
        assert torch.equal(got.to_dense(), sent.to_dense()) and got.is_coalesced() == expected.is_coalesced()
        return
    assert (got.stride(), got.storage_offset(), got.is_contiguous()) == (expected.stride(), expected.storage_offset(), expected.is_contiguous())
    assert torch.equal(got, sent) and got.untyped_storage().data_ptr() != sent.untyped_storage().data_ptr()


def arrive(shipment, files: SharedFiles | None = None, protocol: int = 5) -> dict:
    """The values as a process that unpickles `shipment` gets them (pickled while `files` places)."""
    if files is None:
        return pickle.loads(pickle.dumps(shipment, protocol=protocol)).unpack()
    with files.placing():
        data = pickle.dumps(shipment, protocol=protocol)
    return pickle.loads(data).unpack()


@pytest.mark.parametrize("way", ["shared memory", "in the pickle", "in a protocol 4 pickle", "unpacked where shipped"])
def test_values_arrive_exact_with_views_sharing_their_storage(way):
    values = notebook_values()
    shipment = ship(values)
    assert len(shipment.data) < LARGE  # the bytes of tensors and large arrays are not in the pickle
    files = SharedFiles()
    try:
        if way == "unpacked where shipped":
            got = shipment.unpack()
        else:
            got = arrive(shipment, files if way == "shared memory" else None, 4 if "4" in way else 5)
    finally:
        files.remove()
    assert list(got) == list(values)
    for name in values:
        assert_same(values[name], got[name])
    storage = got["big"].untyped_storage().data_ptr()
    assert got["rows"].untyped_storage().data_ptr() == storage == got["transposed"].untyped_storage().data_ptr()
    got["big"][15, 0] = 1234.0
    assert got["rows"][5, 0].item() == 1234.0 and values["big"][15, 0].item() != 1234.0
    assert got["weight"] is got["model"].weight
    assert shm_files() == []


def test_each_arrival_maps_its_own_copy_on_write_view_and_removes_its_link():
    values = {"big": torch.zeros(2 * MB // 4), "array": np.zeros(2 * MB // 8)}
    shipment = ship(values)
    files = SharedFiles()
    try:
        with files.placing():
            sent = [pickle.dumps(shipment, protocol=5) for _rank in range(2)]
            assert len(shm_files()) == 3  # the file and a link for each of the two ranks
        assert len(shm_files()) == 2  # every rank started: only their links are left
        first = pickle.loads(sent[0]).unpack()
        assert len(shm_files()) == 1
        second = pickle.loads(sent[1]).unpack()
        assert shm_files() == []  # every rank has mapped it: nothing left in /dev/shm
        first["big"][0], first["array"][0] = 7.0, 7.0
        assert second["big"][0].item() == second["array"][0] == values["big"][0].item() == values["array"][0] == 0.0
        assert first["big"][0].item() == first["array"][0] == 7.0
    finally:
        files.remove()


def test_small_values_write_no_file():
    files = SharedFiles()
    with files.placing():
        pickle.dumps(ship({"small": torch.arange(10.0), "tiny": np.arange(10)}), protocol=5)
        assert shm_files() == []


def _statvfs_with(free: int):
    real = os.statvfs

    def statvfs(path):
        stats = real(path)
        if path != SHM_DIR:
            return stats
        return os.statvfs_result((stats.f_bsize, 4096, stats.f_blocks, free // 4096, free // 4096, *stats[5:]))

    return statvfs


def _no_room(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_without_room_in_dev_shm_the_values_go_inside_the_pickle_and_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(shared_tensors.os, "statvfs", _statvfs_with(6 * MB))
    why = "they need 9 MB and /dev/shm has 6 MB free (half of it may be used)"
    values = {"big": torch.randn(2 * MB), "array": np.random.default_rng(0).random(MB // 8)}
    shipment, files = ship(values), SharedFiles()
    try:
        with files.placing():
            sent = [pickle.dumps(shipment, protocol=5) for _rank in range(2)]
            assert shm_files() == []
    finally:
        files.remove()
    assert all(len(data) > 8 * MB for data in sent)
    for data in sent:
        got = pickle.loads(data).unpack()
        assert_same(values["big"], got["big"])
        assert_same(values["array"], got["array"])
    err = capsys.readouterr().err
    assert err.count("nbfabric: the notebook's large tensors and arrays go to the spawned ranks through pipes") == 1
    assert why in err


def test_a_rank_waits_until_the_file_is_written():
    real_pwrite, gate = os.pwrite, threading.Event()

    def held_pwrite(*args):
        gate.wait()
        return real_pwrite(*args)

    values = {"big": torch.randn(2 * MB)}
    shipment, files, got = ship(values), SharedFiles(), {}
    try:
        os.pwrite = held_pwrite  # the writer thread's calls wait for the gate
        with files.placing():
            sent = pickle.dumps(shipment, protocol=5)
        rank = threading.Thread(target=lambda: got.update(pickle.loads(sent).unpack()))
        rank.start()
        rank.join(0.3)
        assert rank.is_alive() and got == {}  # waiting on the file's lock
        gate.set()
        rank.join(10)
        assert not rank.is_alive()
    finally:
        gate.set()
        os.pwrite = real_pwrite
        files.remove()
    assert_same(values["big"], got["big"])
    assert shm_files() == []


def test_a_failed_write_reaches_each_rank_as_a_clear_error(monkeypatch):
    monkeypatch.setattr(shared_tensors.os, "pwrite", _no_room)
    shipment, files = ship({"big": torch.randn(2 * MB), "array": np.zeros(MB // 8)}), SharedFiles()
    try:
        with files.placing():
            sent = [pickle.dumps(shipment, protocol=5) for _rank in range(2)]
        for data in sent:
            with pytest.raises(NotDelivered, match=r"did not reach this rank: writing 9 MB to /dev/shm failed: \[Errno 28\] No space left on device\. More room in /dev/shm"):
                pickle.loads(data).unpack()
    finally:
        files.remove()
    assert shm_files() == []


def test_a_run_that_ends_while_writing_releases_its_ranks():
    real_pwrite, started = os.pwrite, threading.Event()

    def slow_pwrite(fd, data, offset):
        started.set()
        time.sleep(0.2)
        return real_pwrite(fd, data[: 1 << 16], offset)

    def rank():
        try:
            pickle.loads(sent).unpack()
        except NotDelivered as error:
            failed.append(str(error))

    shipment, files, failed = ship({"big": torch.zeros(8 * MB)}), SharedFiles(), []
    waiting = threading.Thread(target=rank)
    try:
        os.pwrite = slow_pwrite
        with files.placing():
            sent = pickle.dumps(shipment, protocol=5)
        assert started.wait(10)
        waiting.start()
        time.sleep(0.3)  # the rank waits on the file's lock
        files.remove()  # as the launcher does when the run ends: stops the writer within one write
        waiting.join(10)
    finally:
        os.pwrite = real_pwrite
        files.remove()
    assert not waiting.is_alive() and failed and "the run ended first" in failed[0]
    assert shm_files() == []


def _digest(value) -> str:
    data = value.numpy() if isinstance(value, torch.Tensor) else value
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def _read_and_write(shipment, signal_file: str):
    """Rank 1 writes into its tensor and array, then says so; rank 0 then reads its own."""
    values = shipment.unpack()
    if os.environ["RANK"] == "1":
        values["big"][0], values["array"][0] = -1.0, -1.0
        open(signal_file, "w").close()
        return None
    while not os.path.exists(signal_file):
        time.sleep(0.01)
    return {name: _digest(value) for name, value in values.items()}, shm_files(os.getppid())


def test_spawned_ranks_get_exact_values_each_its_own(tmp_path, capsys):
    values = {"big": torch.randn(4 * MB), "array": np.random.default_rng(0).random(MB)}
    digests, left = launch(
        partial(_read_and_write, ship(values), str(tmp_path / "written")), nprocs=2, start_method="spawn", sink=Sink()
    )
    assert digests == {name: _digest(value) for name, value in values.items()}
    assert left == []  # every rank has its mapping: the files are gone while they run
    assert shm_files() == [] and "through pipes" not in capsys.readouterr().err


def test_spawned_ranks_get_the_values_through_pipes_without_room(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shared_tensors.os, "statvfs", _statvfs_with(MB))
    values = {"big": torch.randn(4 * MB), "array": np.random.default_rng(0).random(MB)}
    digests, _ = launch(partial(_read_and_write, ship(values), str(tmp_path / "written")), nprocs=2, start_method="spawn", sink=Sink())
    assert digests == {name: _digest(value) for name, value in values.items()}
    assert "go to the spawned ranks through pipes" in capsys.readouterr().err


def test_spawned_ranks_fail_clearly_when_the_file_cannot_be_written(tmp_path, monkeypatch):
    monkeypatch.setattr(shared_tensors.os, "pwrite", _no_room)  # in this process: the launcher's writer
    values = {"big": torch.randn(4 * MB), "array": np.random.default_rng(0).random(MB)}
    with pytest.raises(RankError, match=r"did not reach this rank: writing 24 MB to /dev/shm failed: \[Errno 28\]"):
        launch(partial(_read_and_write, ship(values), str(tmp_path / "written")), nprocs=2, start_method="spawn", sink=Sink())
    assert shm_files() == []


def test_an_interrupt_while_spawned_ranks_start_stops_them_all_once_started(monkeypatch):
    real_spawn, spawned = nbfabric.launcher.spawn_rank, []

    def spawn_then_interrupt(target, spec):
        process = real_spawn(target, spec)
        spawned.append(process.pid)
        signal.raise_signal(signal.SIGINT)  # deferred: the next rank still starts
        return process

    monkeypatch.setattr(nbfabric.launcher, "spawn_rank", spawn_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        launch(partial(print, ship({"big": torch.zeros(MB)})), nprocs=2, start_method="spawn", sink=Sink())
    assert len(spawned) == 2 and shm_files() == []  # both started, both stopped (no_leaks: no process left)


class _Slow:
    """Unpickles slowly: a rank stays in its start until the run times out."""

    def __reduce__(self):
        return time.sleep, (60,)


def test_files_go_when_ranks_are_stopped_before_they_map_them():
    seen, done = [], threading.Event()

    def watch():
        while not done.is_set():
            seen.extend(shm_files())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(RankTimeoutError):
            launch(partial(print, _Slow(), ship({"big": torch.zeros(MB)})), nprocs=2, start_method="spawn", timeout=3, sink=Sink())
    finally:
        done.set()
        watcher.join()
    assert {path.rsplit(".", 1)[-1] for path in seen} >= {"0", "1"}  # each rank's link was there when it was stopped
    assert shm_files() == []


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    kernel = Kernel(tmp_path_factory.mktemp("settings") / "none.json")
    yield kernel
    kernel.close()


@pytest.fixture
def no_rank_left(kernel):
    yield
    kernel.assert_no_ranks_left()


SPAWN2 = "%%fabric --accelerator=cpu --devices=2 --start-method=spawn\n"


@pytest.mark.usefixtures("no_rank_left")
def test_a_spawn_cell_reads_notebook_tensors_and_arrays_exactly_and_writes_only_its_own(kernel):
    setup = kernel.run(
        "import glob, hashlib, os, numpy as np\n"
        "def digest(x):\n    return hashlib.sha256(np.ascontiguousarray(x.numpy() if torch.is_tensor(x) else x).tobytes()).hexdigest()\n"
        "big = torch.randn(2048, 1024, dtype=torch.float64)\narray = np.random.default_rng(0).random((1000, 300))\n"
        "expected = (digest(big), digest(array))",
    )
    assert setup["error"] is None, setup["error"]
    out = kernel.run(
        SPAWN2
        + "arrived = (digest(big), digest(array))\n"
        "if fabric.global_rank == 1:\n    big[0, 0], array[0, 0] = -1.0, -1.0\n"
        "fabric.barrier()\n"
        "kept = (digest(big), digest(array))\n"
        "left = glob.glob(f'/dev/shm/nbfabric-ship-{os.getppid()}-*')\n"
        "(big.dtype, tuple(big.shape), big.stride(), array.shape, array.flags.writeable)",
    )
    assert out["error"] is None, out["error"]
    assert "through pipes" not in out["stderr"]  # through shared memory
    assert out["result"] == "(torch.float64, (2048, 1024), (1024, 1), (1000, 300), True)"
    checks = kernel.run("(arrived == expected, kept == expected, left, (digest(big), digest(array)) == expected)")
    assert checks["result"] == "(True, True, [], True)"  # rank 0's copy and the notebook's are untouched by rank 1
    assert shm_files(kernel.pid) == []


@pytest.mark.usefixtures("no_rank_left")
def test_no_file_is_left_after_a_failure_or_an_interrupt(kernel):
    kernel.run("big = torch.randn(4 * 2**20)")
    failed = kernel.run(SPAWN2 + "if fabric.global_rank == 1:\n    raise ValueError('broken on purpose')\nfabric.barrier()\nbig.sum()")
    assert failed["error"]["ename"] == "RankError" and "broken on purpose" in "\n".join(failed["error"]["traceback"])
    assert shm_files(kernel.pid) == []
    seen = _interrupted_when(kernel, SPAWN2 + "import time\ntime.sleep(60)\nbig.sum()", lambda files: bool(files))
    stopped = seen.pop()
    assert seen, "the ranks' files never appeared"
    assert stopped["error"]["ename"] == "KeyboardInterrupt"
    assert shm_files(kernel.pid) == []
    assert kernel.run("1 + 1")["result"] == "2"  # the kernel goes on


@pytest.mark.usefixtures("no_rank_left")
def test_an_interrupt_while_spawned_interpreters_import_stops_them_quietly(kernel):
    """Jupyter's interrupt reaches the kernel's process group, where new interpreters are while
    they import: they must neither print its traceback into the cell nor delay the stop."""
    kernel.run("big = torch.randn(4 * 2**20)")
    seen = _interrupted_when(kernel, SPAWN2 + "big.sum()", _every_rank_started, after=0.2)  # the launch has returned: the ranks import for a second or more
    stopped = seen.pop()
    assert seen, "the ranks never started"
    assert stopped["error"]["ename"] == "KeyboardInterrupt"
    assert "it was still starting" in stopped["error"]["evalue"]
    assert stopped["stderr"] == ""
    assert shm_files(kernel.pid) == []


def _every_rank_started(files: list[str]) -> bool:
    """Only the ranks' links to the file are left: its own name goes once every rank has started."""
    return bool(files) and all(name.rpartition(".")[2].isdigit() for name in files)


def _interrupted_when(kernel, cell: str, ready, after: float = 0.0) -> list:
    """Run `cell`, interrupting the kernel `after` seconds once `ready(its files in /dev/shm)`: the
    files seen then, followed by what the cell showed."""
    seen: list = []
    watcher_done = threading.Event()

    def watch():
        while not watcher_done.is_set() and not seen:
            files = shm_files(kernel.pid)
            if ready(files):
                seen.extend(files)
                time.sleep(after)
                kernel.interrupt()
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        shown = kernel.run(cell)
    finally:
        watcher_done.set()
        watcher.join()
    return [*seen, shown]


@pytest.mark.usefixtures("no_rank_left")
def test_a_spawn_cell_brings_back_objects_of_notebook_classes_as_the_notebook_s_own(kernel):
    """A spawned rank gets the notebook's classes and functions by value; what the cell binds
    comes back made of the notebook's own (isinstance holds), as with fork."""
    setup = kernel.run(
        "class Scaler(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.weight = torch.nn.Parameter(torch.ones(2))\n"
        "    def forward(self, x):\n        return x * self.weight\n"
        "def triple(x):\n    return 3 * x\n"
    )
    assert setup["error"] is None, setup["error"]
    out = kernel.run(
        SPAWN2
        + "scaler = fabric.setup(Scaler())\n"
        "fabric.backward(scaler(torch.ones(2)).sum())\n"
        "with torch.no_grad():\n    scaler.weight -= 0.5 * scaler.weight.grad\n"
        "f = triple\n"
    )
    assert out["error"] is None, out["error"]
    assert "not brought back" not in out["stderr"], out["stderr"]
    checks = kernel.run("(type(scaler) is Scaler, f is triple, scaler.weight.tolist())")
    assert checks["result"] == "(True, True, [0.5, 0.5])"
