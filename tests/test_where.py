"""Where each rank is when a run hangs: its stack, taken before the ranks are stopped, shown in the
error, in the dashboard and on `nbfabric run`; `%fabric where` on a live run; `--debug`."""

from __future__ import annotations

import os
import textwrap
import time

import pytest
import torch
from test_magic import Kernel

from nbfabric import Fabric, RankError, RankTimeoutError, UnreachedCollectiveError
from nbfabric.launcher import stacks
from nbfabric.launcher.output import Sink

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)

LIB = os.path.dirname(torch.__file__)


def _line_of(code: str) -> int:
    """The line of this file that holds `code` (ranks running this file's functions stop there)."""
    lines = open(__file__).read().splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.strip() == code)


def _dump(*frames: tuple[str, int, str], main: str = "0x00007f0000000001") -> str:
    """What a rank writes when asked: the listener's header, then faulthandler's dump (innermost first)."""
    lines = [f"{stacks.HEADER}{main}", "Thread 0x00007f0000000002 (most recent call first):", '  File "/x/threading.py", line 1 in wait', ""]
    lines.append(f"Current thread {main} (most recent call first):")
    lines += [f'  File "{name}", line {line} in {function}' for name, line, function in frames]
    return "\n".join(lines) + "\n"


def test_a_rank_in_a_collective_is_named_with_the_collective_and_the_users_line(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import torch\n\ndef step(fabric):\n    fabric.all_reduce(torch.ones(2))\n")
    dump = _dump(
        (f"{LIB}/distributed/distributed_c10d.py", 3245, "all_reduce"),
        (f"{LIB}/distributed/c10d_logger.py", 83, "wrapper"),
        (str(script), 4, "step"),
        (str(script), 9, "<module>"),
    )
    place = stacks.parse(dump, 0)
    assert place.summary() == f"all_reduce at {script}, line 4"
    assert place.details() == [f"{script}, line 9, in <module>: ", f"{script}, line 4, in step: fabric.all_reduce(torch.ones(2))"]


def test_a_rank_in_a_native_call_is_named_by_the_call_on_its_line(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import time\nif True:\n    time.sleep(60)\n")
    assert stacks.parse(_dump((str(script), 3, "<module>")), 1).summary() == f"time.sleep at {script}, line 3"



@pytest.mark.parametrize(
    ("inner", "shown"),
    [
        ([("fabric.py", "_join"), (f"{LIB}/distributed/distributed_c10d.py", "init_process_group"), ("launcher/store_client.py", "_answer")],
         "joining the run (init_process_group)"),
        ([("notebook/cell.py", "pack_for_notebook"), (f"{os.path.dirname(LIB)}/cloudpickle/cloudpickle.py", "dump")], "packing the cell's names for the notebook"),
        ([("launcher/worker.py", "report_failure"), ("channel.py", "send")], "reporting its failure"),
        ([("launcher/worker.py", "become_rank"), ("launcher/worker.py", "_redirect_output")], "starting"),
        ([("channel.py", "send"), ("channel.py", "frame")], "sending its result"),
        ([("launcher/worker.py", "_join_threads"), (f"{os.path.dirname(os.__file__)}/threading.py", "join")], "waiting for the threads its code started"),
        ([("launcher/worker.py", "_stay_until_let_go"), ("launcher/store_client.py", "wait_until_let_go")], "finished, waiting for the other ranks"),
        ([("launcher/worker.py", "_announce_exit"), ("channel.py", "send")], "finished, waiting for the other ranks"),
    ],
    ids=["joining", "packing", "reporting", "starting", "sending", "threads", "let-go", "exiting"],
)
def test_a_rank_in_nbfabric_s_own_steps_is_named_by_the_step(inner, shown):
    """Outside the user's code, the innermost nbfabric or library function says little ("_answer at
    .../store_client.py"); the step the rank is in says what it does."""
    package = os.path.dirname(stacks.__file__).rsplit(os.sep, 1)[0]
    frames = [(f"{package}/launcher/worker.py", 1, "rank_main"), (f"{package}/launcher/worker.py", 2, "run_rank")]
    frames += [(name if name.startswith("/") else f"{package}/{name}", 10, function) for name, function in inner]
    assert stacks.parse(_dump(*reversed(frames)), 1).summary() == shown

def test_a_dump_without_the_main_thread_says_so():
    assert stacks.parse("garbage\n", 0).summary() == "its stack could not be read"


def _hang(rank_waiting_in_all_reduce: int):
    def train(fabric):
        if fabric.global_rank == rank_waiting_in_all_reduce:
            fabric.all_reduce(torch.ones(2))  # the hang: rank 0
        else:
            time.sleep(60)  # the hang: rank 1

    return train


def test_a_hang_ended_by_the_timeout_names_where_each_rank_was():
    with pytest.raises(RankTimeoutError) as caught:
        Fabric(accelerator="cpu", devices=2, timeout=3).launch(_hang(0))
    places = caught.value.places
    reduce, sleep = _line_of("fabric.all_reduce(torch.ones(2))  # the hang: rank 0"), _line_of("time.sleep(60)  # the hang: rank 1")
    assert places[0].summary() == f"all_reduce at {__file__}, line {reduce}"
    assert places[1].summary() == f"time.sleep at {__file__}, line {sleep}"
    message = str(caught.value)
    assert f"Where the ranks were at the deadline:\nrank 0: all_reduce at {__file__}, line {reduce}\n" in message
    assert f"rank 1: time.sleep at {__file__}, line {sleep}\n    {__file__}, line {sleep}, in train: time.sleep(60)  # the hang: rank 1" in message


class _StopWhenBothWait(Sink):
    """Once both ranks said they are about to wait, asks where they are (as the Where button does)
    until both wait, then stops the run (as the Stop button does)."""

    def __init__(self):
        self.announced = 0
        self.both_wait = False

    def line(self, rank, stream, text):
        self.announced += text == "waiting"

    def take_where_request(self):
        return self.announced == 2 and not self.both_wait

    def places(self, places, *, live):
        summaries = " ".join(place.summary() for place in places.values())
        self.both_wait |= live and "all_reduce at" in summaries and "time.sleep at" in summaries

    def tick(self):
        return self.both_wait


def _announced_hang(fabric):
    print("waiting", flush=True)
    if fabric.global_rank == 0:
        fabric.all_reduce(torch.ones(2))  # the announced hang: rank 0
    else:
        time.sleep(60)  # the announced hang: rank 1


def test_a_stopped_spawned_run_names_where_each_rank_was():
    with pytest.raises(KeyboardInterrupt) as caught:
        Fabric(accelerator="cpu", devices=2, start_method="spawn")._launch(_announced_hang, sink=_StopWhenBothWait())
    reduce, sleep = _line_of("fabric.all_reduce(torch.ones(2))  # the announced hang: rank 0"), _line_of("time.sleep(60)  # the announced hang: rank 1")
    assert caught.value.places[0].summary() == f"all_reduce at {__file__}, line {reduce}"
    assert caught.value.places[1].summary() == f"time.sleep at {__file__}, line {sleep}"
    assert f"every rank was stopped\n\nWhere the ranks were then:\nrank 0: all_reduce at {__file__}, line {reduce}" in str(caught.value)


def test_a_failure_names_where_the_stopped_peer_waited(tmp_path):
    in_collective = tmp_path / "rank 1 waits in all_reduce"

    def train(fabric):
        if fabric.global_rank == 1:
            in_collective.touch()
            fabric.all_reduce(torch.ones(2))  # rank 1 waits here
        while not in_collective.exists():
            time.sleep(0.01)
        time.sleep(0.2)  # rank 1 is inside the collective, not on its way there
        raise ValueError("rank 0 broke")

    with pytest.raises(RankError) as caught:
        Fabric(accelerator="cpu", devices=2).launch(train)
    assert caught.value.rank == 0
    where = f"rank 1: all_reduce at {__file__}, line {_line_of('fabric.all_reduce(torch.ones(2))  # rank 1 waits here')}"
    assert f"\nwhere the other ranks were: {where}\n" in str(caught.value)


def _barrier_on_rank_0_only(fabric):
    if fabric.global_rank == 0:
        fabric.barrier()  # only rank 0 calls it
    return "done"


@pytest.mark.timeout(60)
def test_a_collective_that_a_finished_rank_never_reaches_ends_the_run_naming_both():
    """Without a timeout, such a run would wait forever: rank 1 has finished and waits for rank 0."""
    started = time.monotonic()
    with pytest.raises(UnreachedCollectiveError) as caught:
        Fabric(accelerator="cpu", devices=2).launch(_barrier_on_rank_0_only)
    assert time.monotonic() - started < 15
    error = caught.value
    assert isinstance(error, RankError) and error.rank == 0 and error.finished == (1,)
    barrier = f"barrier at {__file__}, line {_line_of('fabric.barrier()  # only rank 0 calls it')}"
    assert str(error).startswith(f"rank 0 waits in {barrier}: a collective that rank 1 will not take part in, having finished the run.")
    assert error.places[0].summary() == barrier
    assert error.places[1].finished
    assert "rank 1: finished, waiting for the other ranks\n" in str(error) + "\n"



def _reduce_of_other_shapes(fabric):
    fabric.all_reduce(torch.ones(3 + fabric.global_rank), reduce_op="sum")  # 3 elements on rank 0, 4 on rank 1
    return "done"


@pytest.mark.timeout(60)
def test_a_collective_called_with_other_shapes_on_each_rank_ends_the_run_saying_so():
    """gloo completes the reduce on the rank with fewer elements, which finishes while its peer waits."""
    with pytest.raises(UnreachedCollectiveError) as caught:
        Fabric(accelerator="cpu", devices=2).launch(_reduce_of_other_shapes)
    assert caught.value.finished == (0,) and caught.value.rank == 1
    assert "a collective that rank 0 will not take part in, having finished the run" in str(caught.value)
    assert "with tensors of the same shapes" in str(caught.value) and "--debug" in str(caught.value)

def test_ranks_busy_in_collectives_among_themselves_while_a_peer_has_finished_are_not_stopped():
    """Ranks 0 and 2 reduce on their own group, again and again at one line, past three looks at
    the ranks, while rank 1 waits at the end: they use the CPU, so nothing is stranded."""

    def train(fabric):
        import torch.distributed as dist

        pair = dist.new_group([0, 2])
        rounds = 0
        if fabric.global_rank != 1:
            deadline = time.monotonic() + 5
            going = torch.ones(1)
            while going.item():  # rank 0 decides when both stop
                going = torch.tensor([float(fabric.global_rank != 0 or time.monotonic() < deadline)])
                dist.all_reduce(going, op=dist.ReduceOp.MIN, group=pair)
                rounds += 1
        return rounds  # rank 1 has none: it finished at once

    assert Fabric(accelerator="cpu", devices=3).launch(train) > 100


# ----------------------------------------------------------------- in a notebook
HANG = """
    {magic}
    import time, torch
    if fabric.global_rank == 0:
        fabric.all_reduce(torch.ones(2))
    else:
        time.sleep(1); print("working", flush=True)  # rank 0 waits in all_reduce by then
        time.sleep(60)
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    kernel = Kernel(tmp_path_factory.mktemp("settings") / "none.json")
    yield kernel
    kernel.close()


def _cell_lines(text: str, cell: int) -> None:
    assert f"rank 0: all_reduce at Cell In[{cell}], line 4\n    Cell In[{cell}], line 4, in <module>: fabric.all_reduce(torch.ones(2))" in text
    assert f"rank 1: time.sleep at Cell In[{cell}], line 7\n    Cell In[{cell}], line 7, in <module>: time.sleep(60)" in text


def _next_cell(kernel) -> int:
    """The number of the next cell (IPython counts the running cell already: In[n] reads n + 1)."""
    return int(kernel.run("get_ipython().execution_count")["result"])


def test_a_hang_in_a_cell_ended_by_its_timeout_shows_both_ranks_cell_lines(kernel):
    cell = _next_cell(kernel)
    out = kernel.run(HANG.format(magic="%%fabric --accelerator=cpu --devices=2 --timeout=4"))
    assert out["error"]["ename"] == "RankTimeoutError"
    _cell_lines("\n".join(out["error"]["traceback"]), cell)
    kernel.assert_no_ranks_left()


def test_an_interrupted_hang_shows_both_ranks_cell_lines(kernel):
    cell = _next_cell(kernel)
    out, _ = kernel.run_interrupted(HANG.format(magic="%%fabric --accelerator=cpu --devices=2"), when="[rank 1] working")
    assert out["error"]["ename"] == "KeyboardInterrupt"
    _cell_lines("\n".join(out["error"]["traceback"]), cell)
    kernel.assert_no_ranks_left()


def test_where_shows_a_background_run_and_the_run_goes_on(kernel):
    cell = _next_cell(kernel)
    kernel.run(HANG.format(magic="%%fabric --accelerator=cpu --devices=2 --no-widgets --background"))
    try:
        deadline = time.monotonic() + 60
        shown = ""
        while f"time.sleep at Cell In[{cell}], line 7" not in shown:  # until rank 1 is past its print
            assert time.monotonic() < deadline, shown
            shown = kernel.run("%fabric where")["stdout"]
        _cell_lines(shown, cell)
        assert "is running" not in kernel.run("%fabric where")["stdout"]
        assert len(kernel.children()) >= 2  # asking stopped nothing
    finally:
        assert "stopped the background run" in kernel.run("%fabric stop")["stdout"]
    kernel.assert_no_ranks_left()


def test_debug_turns_a_mismatched_collective_into_an_error_naming_both_calls(kernel):
    out = kernel.run(
        textwrap.dedent(
            """
            %%fabric --accelerator=cpu --devices=2 --debug --timeout=60
            import torch
            if fabric.global_rank == 0:
                fabric.all_reduce(torch.ones(2))
            else:
                fabric.barrier()
            """
        )
    )
    traceback = "\n".join(out["error"]["traceback"])
    assert out["error"]["ename"] == "RankError"
    assert "Detected mismatch between collectives on ranks" in traceback
    # each rank's call: from torch's check on that rank, or from where the stopped peer was
    calls = traceback.replace("OpType=ALLREDUCE", "all_reduce").replace("OpType=BARRIER", "barrier")
    assert "all_reduce" in calls and "barrier" in calls, traceback
    assert "did not finish within" not in traceback
    kernel.assert_no_ranks_left()


def test_a_rank_in_a_lambda_is_named_by_the_call_inside_it(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("Fabric(devices=2).launch(lambda fabric: time.sleep(60))\n")
    assert stacks.parse(_dump((str(script), 1, "<lambda>")), 0).summary() == f"time.sleep at {script}, line 1"


def _forbidden(*args):
    raise PermissionError(1, "Operation not permitted")


@pytest.mark.parametrize("memfd", ["exists", "missing", "forbidden"])
def test_a_stack_file_holds_what_the_rank_writes_where_memfd_exists_and_where_not(monkeypatch, memfd):
    """Linux keeps a rank's stack file in memory; elsewhere (macOS, a sandbox that forbids the
    call) it is an unlinked temporary file."""
    if memfd == "missing":
        monkeypatch.delattr(os, "memfd_create", raising=False)
    elif memfd == "forbidden":
        monkeypatch.setattr(os, "memfd_create", _forbidden, raising=False)
    elif not hasattr(os, "memfd_create"):
        pytest.skip("no memfd_create here")
    stack_file = stacks.StackFile()
    try:
        rank_end = os.dup(stack_file.fd)  # what the rank writes through
        os.write(rank_end, b"Current thread 0x1 (most recent call first):\n")
        os.close(rank_end)
        assert stack_file.size() > 0 and stack_file.read().startswith("Current thread")
    finally:
        stack_file.close()
