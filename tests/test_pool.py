"""A rank pool of local ipyparallel engines, driven from a real kernel: state kept across cells,
failures, interrupts, timeouts, a lost rank, names that cannot be sent, and nothing left after."""

from __future__ import annotations

import textwrap
import threading
import time

import psutil
import pytest
from test_magic import Kernel

POOL = "%%fabric --no-widgets"


@pytest.fixture(scope="module")
def module_kernel(tmp_path_factory):
    """One kernel for the module; the fixtures below put it in the state each test needs."""
    kernel = Kernel(tmp_path_factory.mktemp("settings") / "none.json")
    yield kernel
    kernel.run("%fabric stop-pool")
    kernel.close()


@pytest.fixture
def kernel(module_kernel, request):
    """The kernel with a working pool of 2 local engines: the one an earlier test left, or a new
    one where none is up or it is broken. The leak check starts once the pool is up."""
    if "rank 1: node" not in module_kernel.run("%fabric pool")["stdout"]:
        out = module_kernel.run("%fabric start --devices=2 --engines=local", timeout=180)
        assert out["error"] is None and "rank 1: node" in out["stdout"], out
    request.getfixturevalue("no_leaks")
    return module_kernel


@pytest.fixture
def kernel_without_pool(module_kernel, request):
    """The kernel with no rank pool, neither a working nor a broken one."""
    if "no rank pool; %fabric start makes one" not in module_kernel.run("%fabric pool")["stdout"]:
        assert module_kernel.run("%fabric stop-pool")["error"] is None
    module_kernel.assert_no_ranks_left(grace=15)
    request.getfixturevalue("no_leaks")
    return module_kernel


def engines(kernel) -> list[int]:
    return [p.pid for p in psutil.Process(kernel.pid).children(recursive=True)]


def test_a_model_set_up_in_one_cell_trains_on_in_the_next_two(kernel):
    assert "rank 1: node" in kernel.run("%fabric pool")["stdout"]
    kernel.run("torch.manual_seed(0)\nnet = torch.nn.Linear(4, 1)\nx, y = torch.randn(64, 4), torch.randn(64, 1)")
    out = kernel.run(
        f"""
        {POOL}
        import os
        model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
        engine = os.getpid()
        losses = []
        print("engine", engine)
        """
    )
    assert out["error"] is None, out["error"]
    rank1_engine = out["stdout"].split("[rank 1] engine ")[1].split()[0]
    step = textwrap.dedent(f"""
        {POOL}
        for _ in range(5):
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad(); fabric.backward(loss); optimizer.step()
        losses.append(loss.item())
        print("same process:", engine == os.getpid(), len(losses))
        fabric.log("loss", loss.item(), step=len(losses))
        """)
    second, third = kernel.run(step), kernel.run(step + "\nlosses")
    assert second["error"] is None and third["error"] is None, (second["error"], third["error"])
    assert "[rank 1] same process: True 2" in third["stdout"] and "[rank 0] same process: True 2" in third["stdout"]
    first_loss, last_loss = eval(third["result"])
    assert last_loss < first_loss
    out = kernel.run(f"{POOL} --out run\nfabric.log('seen', float(fabric.global_rank))\nfabric.all_reduce(torch.tensor(1.0), reduce_op='sum').item()")
    assert out["result"] == "2.0"
    assert kernel.run("run.metrics.by_rank('seen')")["result"] == "{0: [0.0], 1: [1.0]}"
    kernel.run("%fabric pull engine --rank=1")
    assert kernel.run("engine")["result"] == rank1_engine


def test_a_flood_of_lines_and_metrics_from_every_rank_arrives_whole_and_in_order(kernel):
    out = kernel.run(
        f"""{POOL} --out flood
        for step in range(100):
            for line in range(400):
                print(step, line)
            fabric.log("loss", float(step), step=step)
        print("end of rank", fabric.global_rank)""",
        timeout=300,
    )
    assert out["error"] is None, out["error"]
    for rank in (0, 1):  # (the expected text is made in the kernel: a large request would start pyzmq's gc thread here)
        expected = f"''.join(f'{{step}} {{line}}\\n' for step in range(100) for line in range(400)) + 'end of rank {rank}'"
        assert kernel.run(f"flood.output(rank={rank}) == {expected}")["result"] == "True"
    assert kernel.run("flood.metrics.by_rank('loss') == {r: [float(s) for s in range(100)] for r in (0, 1)}")["result"] == "True"


DESCRIPTORS = POOL + """
import ctypes, os, subprocess, sys
rank = fabric.global_rank
os.write(1, f"descriptor {rank}\\n".encode())
subprocess.run(["echo", f"subprocess {rank}"], check=True)
ctypes.CDLL(None).printf(b"from C %d\\n", ctypes.c_int(rank))  # held in C's buffer until the run ends
sys.stdout.buffer.write("bytes \\u2713\\n".encode())
os.write(2, b"descriptor 2\\n")
print("print", rank)"""


def test_what_the_ranks_write_to_descriptors_c_and_stdout_buffer_shows_as_print_does(kernel):
    for _ in range(2):  # and again in the next run
        out = kernel.run(DESCRIPTORS)
        assert out["error"] is None, out["error"]
        for rank in (0, 1):
            for line in (f"descriptor {rank}", f"subprocess {rank}", f"from C {rank}", "bytes \u2713", f"print {rank}"):
                assert f"[rank {rank}] {line}\n" in out["stdout"], out["stdout"]
            assert f"[rank {rank}] descriptor 2\n" in out["stderr"], out["stderr"]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_that_leaves_by_sys_exit_0_leaves_the_cell_as_a_forked_rank_does(kernel, rank):
    """Not a failure: it is said in the rank's stderr, the others go on, and (rank 0) nothing comes back."""
    out = kernel.run(f"{POOL}\nimport sys\nleft_early = 1\nif fabric.global_rank == {rank}:\n    sys.exit(0)\nprint('stayed')")
    assert out["error"] is None, out["error"]
    assert f"[rank {rank}] left the run: sys.exit(0) at Cell In[" in out["stderr"], out["stderr"]
    assert f"[rank {1 - rank}] stayed" in out["stdout"]
    assert ("nothing was brought back: rank 0 left the run" in out["stderr"]) == (rank == 0), out["stderr"]
    assert kernel.run(f"{POOL}\nfabric.all_reduce(torch.tensor(1.0), reduce_op='sum').item()")["result"] == "2.0"  # and the pool goes on


def test_after_a_failed_cell_the_ranks_keep_what_it_bound_saying_so_and_a_name_it_deleted_is_the_notebooks_again(kernel):
    kernel.run("kept_name, gone_name = 1, 5")
    assert kernel.run(f"{POOL}\nkept_name + gone_name")["result"] == "6"  # both are on the ranks now
    out = kernel.run(f"{POOL}\nkept_name = 2\ndel gone_name\nraise ValueError('boom')")
    assert out["error"]["ename"] == "RankError", out["error"]
    assert "what this cell bound on the pool's ranks before it stopped stays there for the next cells: kept_name; the notebook keeps its own values" in out["stderr"]
    assert kernel.run("(kept_name, gone_name)")["result"] == "(1, 5)"
    assert kernel.run(f"{POOL}\n(kept_name, gone_name)")["result"] == "(2, 5)"


def test_a_message_lost_on_the_way_from_an_engine_is_said_and_the_rest_replayed():
    """Messages of one engine arrive in order: when a later one is there and the next is not, the
    next was lost (a socket past its high-water mark drops them)."""
    from nbfabric.launcher.output import Sink
    from nbfabric.pool.launcher import _PoolRun

    class Lines(Sink):
        def __init__(self):
            self.lines = []

        def line(self, rank, stream, text):
            self.lines.append((rank, stream, text))

    sink = Lines()
    run = _PoolRun(None, sink, None, b"")
    run.data, run.sequence = {0: {"0": [("output", "stdout", "a\n")], "2": [("output", "stdout", "c\n")], "other": "a user's own"}}, {0: 0}
    run._replay(0)
    assert sink.lines == [
        (0, "stdout", "a"),
        (0, "stderr", "(nbfabric: 1 message(s) of this rank's output and metrics were lost on the way from its engine)"),
        (0, "stdout", "c"),
    ]
    assert run.data[0] == {"other": "a user's own"} and run.sequence[0] == 3


def test_names_bound_on_the_ranks_stay_there_until_the_notebook_binds_them_anew(kernel):
    kernel.run("step_size = 1")
    kernel.run(f"{POOL} --no-return\nstep_size = 10 + fabric.global_rank")
    assert "[rank 1] kept 11" in kernel.run(f"{POOL}\nprint('kept', step_size)")["stdout"]  # not the notebook's 1
    kernel.run("step_size = 7")
    assert kernel.run(f"{POOL}\nstep_size + fabric.global_rank")["result"] == "7"
    kernel.run("%fabric pull step_size --rank=1")
    assert kernel.run("step_size")["result"] == "7"
    assert kernel.run(f"{POOL}\nstep_size")["result"] == "7"


def test_a_value_changed_in_place_on_the_ranks_comes_back_and_one_changed_in_the_notebook_is_said_until_pushed(kernel):
    kernel.run("settings = {'lr': 0.1}; seen = []")
    assert kernel.run(f"{POOL}\nseen.append(fabric.global_rank)")["error"] is None
    assert kernel.run("seen")["result"] == "[0]"  # rank 0's, changed in place, and now held on the ranks
    kernel.run(f"{POOL}\nsettings = dict(settings)")
    kernel.run("settings['lr'] = 0.5; seen.append('notebook')")
    out = kernel.run(f"{POOL}\n(settings['lr'], seen)")
    assert out["result"] == "(0.1, [0])"  # the ranks go on with their own, and the cell says so, once
    assert "seen, settings: changed in the notebook since it came back from the pool's ranks" in out["stderr"]
    assert "%fabric push seen" in out["stderr"]
    assert "changed in the notebook" not in kernel.run(f"{POOL}\nsettings['lr']")["stderr"]
    assert "the notebook's goes to the pool's ranks" in kernel.run("%fabric push settings")["stdout"]
    out = kernel.run(f"{POOL}\nsettings['lr'] + fabric.global_rank")
    assert out["result"] == "0.5" and out["stderr"] == "", out


def test_a_name_deleted_on_the_ranks_is_gone_there_and_in_the_notebook(kernel):
    kernel.run(f"{POOL}\nbuffer = [fabric.global_rank] * 3")
    assert kernel.run("buffer")["result"] == "[0, 0, 0]"
    out = kernel.run(f"{POOL}\ndel buffer")
    assert out["error"] is None, out["error"]
    assert kernel.run("'buffer' in globals()")["result"] == "False"
    assert "NameError" in kernel.run(f"{POOL}\nbuffer")["error"]["evalue"]  # the ranks hold it no more
    kernel.run("buffer = 5")  # the notebook's own, sent again
    assert kernel.run(f"{POOL}\nbuffer + fabric.global_rank")["result"] == "5"


def test_a_function_from_a_pool_cell_reads_the_notebook_globals_afterwards(kernel):
    out = kernel.run(f"{POOL}\nOFFSET = 1\ndef shifted(x):\n    return x + OFFSET\nshifted(1)")
    assert out["error"] is None and out["result"] == "2", out
    kernel.run("OFFSET = 100")
    assert kernel.run("shifted(1)")["result"] == "101"


POOL_HANG = f"""{POOL}
import time, torch
if fabric.global_rank == 0:
    fabric.all_reduce(torch.ones(2))
else:
    time.sleep(1); print("working", flush=True)  # rank 0 waits in all_reduce by then
    time.sleep(60)"""


def _shows_both_ranks(text: str, cell: str) -> None:
    assert f"rank 0: all_reduce at Cell In[{cell}], line 4" in text, text
    assert f"rank 1: time.sleep at Cell In[{cell}], line 7" in text, text


def test_an_interrupted_hang_on_the_pool_shows_where_each_rank_was(kernel):
    cell = kernel.run("get_ipython().execution_count")["result"]  # the next cell's number
    out, _ = kernel.run_interrupted(POOL_HANG, when="[rank 1] working")
    assert out["error"]["ename"] == "KeyboardInterrupt"
    _shows_both_ranks("\n".join(out["error"]["traceback"]), cell)


def test_an_interrupt_while_one_rank_has_finished_the_cell_shows_it_finished_as_forked_ranks_do(kernel):
    cell = kernel.run("get_ipython().execution_count")["result"]
    code = f"{POOL}\nimport time\nprint('working', flush=True)\nif fabric.global_rank == 1:\n    time.sleep(60)"
    out, _ = kernel.run_interrupted(code, when="[rank 1] working")
    text = "\n".join(out["error"]["traceback"])
    assert "rank 0: finished, waiting for the other ranks" in text, text
    assert f"rank 1: time.sleep at Cell In[{cell}], line 5" in text, text


def test_input_on_a_pool_rank_fails_at_once_saying_why_as_on_forked_ranks(kernel):
    out = kernel.run(f"{POOL}\nname = input('name? ')", timeout=60)
    assert out["error"]["ename"] == "RankError", out
    assert "EOFError: a rank has no input for input() or getpass() to read" in out["error"]["evalue"], out["error"]


def test_magics_and_shell_commands_run_on_pool_ranks_as_on_forked_ranks(kernel):
    out = kernel.run(f"{POOL}\n!echo shell says hi\n%time x = 1 + fabric.global_rank\nprint('x is', x)", timeout=60)
    assert out["error"] is None and out["stderr"] == "", out
    for rank in (0, 1):
        assert f"[rank {rank}] shell says hi" in out["stdout"] and f"[rank {rank}] x is {1 + rank}" in out["stdout"], out
    assert kernel.run("x")["result"] == "1"


def test_an_interrupt_reaches_the_commands_a_pool_cell_runs_and_the_pool_stays(kernel):
    code = f"{POOL}\nimport os\nprint('working', flush=True)\nos.system('sleep 47')\nprint('after the command')"
    out, took = kernel.run_interrupted(code, when="[rank 1] working")  # (os.system ignores interrupts while it waits)
    assert out["error"]["ename"] == "KeyboardInterrupt" and "the rank pool was ended" not in out["stderr"], out
    assert took < 5, took
    assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "47"]]
    assert kernel.run(f"{POOL}\nfabric.world_size")["result"] == "2"


def test_a_second_interrupt_hurries_the_stop_and_the_pool_keeps_its_model(kernel):
    kernel.run(f"{POOL}\nkept = fabric.setup(torch.nn.Linear(2, 2))")
    interrupted: list[float] = []

    def interrupt_twice(outputs):
        if not interrupted and "[rank 1] working" in outputs["stdout"]:
            interrupted.append(time.monotonic())
            kernel.interrupt()
            time.sleep(0.15)
            kernel.interrupt()

    code = f"{POOL}\nimport time\nprint('working', flush=True)\nif fabric.global_rank == 0:\n    fabric.barrier()\ntime.sleep(60)"
    out = kernel.run(code, on_output=interrupt_twice)
    assert out["error"]["ename"] == "KeyboardInterrupt" and "the rank pool was ended" not in out["stderr"], out
    assert time.monotonic() - interrupted[0] < 10
    assert kernel.run(f"{POOL}\nkept.weight.shape[0] * fabric.world_size")["result"] == "4"


def test_an_interrupted_pull_says_so_and_binds_nothing(kernel):
    kernel.run(f"{POOL}\nimport time\nclass Slow:\n    def __reduce__(self):\n        time.sleep(6)\n        return (int, (7,))\nslow = Slow()")
    kernel.run("slow = 'the notebook keeps this'")
    timer = threading.Timer(1.5, kernel.interrupt)
    timer.start()
    out = kernel.run("%fabric pull slow --rank=1", timeout=60)
    timer.join()
    assert out["error"]["ename"] == "KeyboardInterrupt", out
    assert out["error"]["traceback"] == ["KeyboardInterrupt: the pull of slow was stopped; the notebook's slow is as it was"], out
    assert kernel.run("slow")["result"] == "'the notebook keeps this'"
    assert kernel.run(f"{POOL}\nfabric.world_size", timeout=60)["result"] == "2"


def test_an_interrupted_stop_pool_goes_on_to_its_end_and_leaves_nothing(kernel):
    timer = threading.Timer(0.2, kernel.interrupt)
    timer.start()
    out = kernel.run("%fabric stop-pool", timeout=120)
    timer.join()
    if out["error"] is not None:  # (the stop may be over before the interrupt comes)
        assert out["error"]["traceback"] == ["KeyboardInterrupt: the stop went on to its end: the rank pool was stopped: no engine is left"], out
    else:
        assert "the rank pool was stopped: no engine is left" in out["stdout"], out
    kernel.assert_no_ranks_left(grace=5)
    assert "no rank pool; %fabric start makes one" in kernel.run("%fabric pool")["stdout"]


def test_where_shows_a_background_pool_run_without_stopping_it(kernel):
    cell = kernel.run("get_ipython().execution_count")["result"]
    kernel.run(POOL_HANG.replace(POOL, f"{POOL} --background"))
    try:
        deadline, shown = time.monotonic() + 60, ""
        while f"time.sleep at Cell In[{cell}], line 7" not in shown:  # until rank 1 is past its print
            assert time.monotonic() < deadline, shown
            shown = kernel.run("%fabric where")["stdout"]
        _shows_both_ranks(shown, cell)
    finally:
        kernel.run("%fabric stop")
    assert kernel.run(f"{POOL}\nfabric.world_size")["result"] == "2"  # the pool goes on


def test_displays_from_pool_ranks_reach_the_cell_after_their_rank_s_tag_as_forked_ranks_do(kernel):
    out = kernel.run(f"{POOL}\nprint('before', fabric.global_rank)\ndisplay({{'rank': fabric.global_rank}})\nprint('after', fabric.global_rank)")
    assert out["error"] is None, out["error"]
    assert sorted(out["displays"]) == ["{'rank': 0}", "{'rank': 1}"], out
    for rank in (0, 1):
        assert f"[rank {rank}] before {rank}\n[rank {rank}] \n" in out["stdout"], out["stdout"]


def test_tqdm_auto_bars_from_pool_ranks_show_as_text_bars(kernel):
    out = kernel.run(f"{POOL}\nimport time\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(40)):\n    time.sleep(0.02)")
    assert out["error"] is None, out["error"]
    shown = "\n".join(out["displays"]) + out["stderr"]
    for rank in (0, 1):  # each rank's bar, updated in place, ends at 40/40
        assert f"[rank {rank}] 100%" in shown and "40/40" in shown, shown


RESIDENT_SETUP = """{pool} --strategy={strategy}
import os
os.environ["DS_ACCELERATOR"] = "cpu"
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
{model}, {opt} = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.05))
{losses} = []"""

RESIDENT_STEPS = """{pool} --strategy={strategy}
for _ in range({segments}):  # a segment: 2 steps on a batch drawn from the number of steps so far
    g = torch.Generator().manual_seed(len({losses}))
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
    for _ in range(2):
        loss = torch.nn.functional.mse_loss({model}(x), y)
        fabric.backward(loss)
        {opt}.step()
        {opt}.zero_grad()
        {losses}.append(loss.item())
weights = sum(float((p.full_tensor() if hasattr(p, "full_tensor") else p).double().sum()) for p in {model}.parameters())
({losses}, round(weights, 6)) if fabric.global_rank == 0 else None"""


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_a_model_set_up_on_the_pool_trains_on_across_cells_as_in_one_cell(kernel, strategy):
    names = {"pool": POOL, "strategy": strategy}
    split = dict(names, model="model", opt="opt", losses="losses")
    whole = dict(names, model="whole", opt="whole_opt", losses="whole_losses")
    shown = [kernel.run(RESIDENT_SETUP.format(**split), timeout=300)]
    shown += [kernel.run(RESIDENT_STEPS.format(segments=1, **split), timeout=300) for _ in range(3)]
    shown += [kernel.run(RESIDENT_SETUP.format(**whole), timeout=300)]
    shown += [kernel.run(RESIDENT_STEPS.format(segments=3, **whole), timeout=300)]
    assert [out["error"] for out in shown] == [None] * 6, [out["error"] for out in shown]
    assert "setting up again" not in "".join(out["stderr"] for out in shown)
    three_cells, one_cell = eval(shown[3]["result"]), eval(shown[5]["result"])
    assert len(three_cells[0]) == 6 and three_cells == one_cell  # the same losses, and the same weights
    if strategy != "ddp":  # said plainly, not as a pickling error
        assert "held over the ranks by" in shown[0]["stderr"] and "stay on the pool's ranks" in shown[0]["stderr"]
        assert "cannot be pickled" not in shown[0]["stderr"], shown[0]["stderr"]


STOPPED_TRAINING = """{pool} --strategy={strategy}
import time
for step in range(10_000):
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    if fabric.global_rank == {slow_rank}:
        time.sleep(0.2)  # the stop finds this rank here, and (if it is one rank only) its peer in the step's all-reduce
    loss = torch.nn.functional.mse_loss(model(x), y)
    fabric.backward(loss)
    opt.step()
    opt.zero_grad()
    print("step", step, flush=True)"""

TRAIN_ON = """{pool} --strategy={strategy}
before = [p.detach().clone() for p in model.parameters()]
for _ in range(3):
    loss = torch.nn.functional.mse_loss(model(torch.randn(16, 8)), torch.randn(16, 1))
    fabric.backward(loss)
    opt.step()
    opt.zero_grad()
whole = lambda p: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double()
moved = any(not torch.equal(whole(a), whole(b)) for a, b in zip(before, model.parameters()))
weights = fabric.all_gather(torch.tensor(sum(float(whole(p).sum()) for p in model.parameters()), dtype=torch.float64))
(moved, weights.tolist()) if fabric.global_rank == 0 else None"""


@pytest.mark.parametrize(
    ("strategy", "stopped_in"),
    [
        *((strategy, place) for strategy in ("ddp", "fsdp", "deepspeed_stage_2") for place in ("a collective", "python")),
        ("deepspeed_stage_1", "python"),
        ("deepspeed_stage_3", "python"),
    ],
)
def test_a_model_trains_on_after_an_interrupted_training_cell(kernel, strategy, stopped_in):
    """Interrupted with one rank in the step's all-reduce, the ranks leave their process group and the
    next run meets in a new one, where DDP and FSDP models go on (DeepSpeed's is refused, saying why);
    interrupted with both ranks in Python, every model goes on in the same group."""
    names = {"pool": POOL, "strategy": strategy}
    assert kernel.run(RESIDENT_SETUP.format(model="model", opt="opt", losses="losses", **names), timeout=300)["error"] is None
    slow_rank = 0 if stopped_in == "a collective" else "fabric.global_rank"
    out, _ = kernel.run_interrupted(STOPPED_TRAINING.format(slow_rank=slow_rank, **names), when="[rank 0] step 2")
    assert out["error"]["ename"] == "KeyboardInterrupt", out["error"]
    assert ("left their process group" in out["stderr"]) == (stopped_in == "a collective"), out["stderr"]
    after = kernel.run(TRAIN_ON.format(**names), timeout=300)
    if strategy.startswith("deepspeed") and stopped_in == "a collective":
        assert after["error"]["ename"] == "RankError"
        assert "DeepSpeed model set up before the stop is bound to the process group the stop ended" in "\n".join(after["error"]["traceback"])
        # what the refusal says to do works: a model set up again trains in the new group
        assert kernel.run(RESIDENT_SETUP.format(model="model", opt="opt", losses="losses", **names), timeout=300)["error"] is None
        after = kernel.run(TRAIN_ON.format(**names), timeout=300)
    assert after["error"] is None, after["error"]
    moved, weights = eval(after["result"])
    assert moved and weights[0] == weights[1]  # it trained, and both ranks hold the same model


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_a_deepspeed_model_whose_ranks_stopped_at_different_steps_is_refused_saying_so(kernel, strategy):
    """A stop that cut one rank's optimizer step short (as if: rank 1's engine counted one more step)
    would leave the ranks training apart: the next use of the model says so instead."""
    names = {"pool": POOL, "strategy": strategy}
    assert kernel.run(RESIDENT_SETUP.format(model="apart", opt="apart_opt", losses="apart_losses", **names), timeout=300)["error"] is None
    failed = kernel.run(
        f"{POOL} --strategy={strategy}\nif fabric.global_rank == 1:\n    apart._forward_module.global_steps += 1\n"
        "raise RuntimeError('the cell failed')", timeout=300,
    )
    assert failed["error"]["ename"] == "RankError", failed["error"]
    after = kernel.run(TRAIN_ON.format(**names).replace("model", "apart").replace("opt.", "apart_opt."), timeout=300)
    assert after["error"]["ename"] == "RankError", after["error"]
    assert "the stop landed inside the DeepSpeed model's optimizer step on some ranks and not on others (rank 0: step 0, rank 1: step 1)" in "\n".join(after["error"]["traceback"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_pull_brings_a_model_set_up_on_the_pool_whole_while_the_ranks_train_on(kernel, strategy):
    names = {"pool": POOL, "strategy": strategy, "model": "pulled", "opt": "pulled_opt", "losses": "pulled_losses"}
    assert kernel.run(RESIDENT_SETUP.format(**names), timeout=300)["error"] is None
    assert kernel.run(RESIDENT_STEPS.format(segments=1, **names), timeout=300)["error"] is None
    probe = "probe = torch.linspace(-1, 1, 24).reshape(3, 8)"
    kernel.run(probe)
    on_ranks = kernel.run(f"{POOL} --strategy={strategy}\nwith torch.no_grad():\n    out = pulled(probe)\nout.double().sum().item()", timeout=300)
    assert on_ranks["error"] is None, on_ranks["error"]
    pulled = kernel.run("%fabric pull pulled", timeout=300)
    assert pulled["error"] is None and "not brought back" not in pulled["stderr"], pulled
    here = kernel.run(
        "(type(pulled).__name__, {type(p).__name__ for p in pulled.parameters()}, {p.device.type for p in pulled.parameters()}, "
        "torch.no_grad()(pulled)(probe).double().sum().item())"
    )
    assert eval(here["result"]) == ("Sequential", {"Parameter"}, {"cpu"}, float(on_ranks["result"]))
    on = kernel.run(RESIDENT_STEPS.format(segments=1, **names), timeout=300)  # the ranks' model trains on
    assert on["error"] is None and len(eval(on["result"])[0]) == 4, on["error"]


def test_a_background_cell_on_the_pool_leaves_its_names_on_the_ranks(kernel):
    kernel.run(f"{POOL} --background\nimport time\ntime.sleep(3)\nlater = 5 + fabric.global_rank")
    for line in ("%fabric stop-pool", "%fabric pull later"):  # not from under the running cell
        refused = kernel.run(line)
        assert "UsageError: the background run of cell [" in refused["stderr"] and "is still running" in refused["stderr"], refused
    assert kernel.run("%fabric wait")["error"] is None
    assert kernel.run("later")["result"] == "5"
    assert "[rank 1] 6" in kernel.run(f"{POOL}\nprint(later)")["stdout"]


def test_notebook_functions_reach_their_globals_on_the_ranks(kernel):
    kernel.run("HIDDEN = 5\ndef width():\n    return HIDDEN * 2")
    assert kernel.run(f"{POOL}\nwidth()")["result"] == "10"


def test_a_failing_rank_names_its_cell_line_and_the_pool_runs_the_next_cell(kernel):
    out = kernel.run(f"{POOL}\nx = 1\nif fabric.global_rank == 1:\n    raise ValueError('broken on purpose')")
    error = "\n".join(out["error"]["traceback"])
    assert out["error"]["ename"] == "RankError"
    assert "rank 1 failed: ValueError: broken on purpose" in error and "Cell In[" in error and "line 4" in error
    assert kernel.run(f"{POOL}\nfabric.world_size")["result"] == "2"


def test_interrupt_stops_the_cell_on_every_rank_and_the_pool_stays(kernel):
    out, seconds = kernel.run_interrupted(f"{POOL}\nimport time\nprint('working', flush=True)\ntime.sleep(60)", when="[rank 0] working")
    assert seconds < 30
    assert out["error"]["ename"] == "KeyboardInterrupt"
    assert "[rank 0] working" in out["stdout"]
    assert kernel.run(f"{POOL}\nfabric.all_reduce(torch.tensor(2.0), reduce_op='sum').item()")["result"] == "4.0"


def test_a_timeout_stops_the_cell_and_the_pool_stays(kernel):
    out = kernel.run(f"{POOL} --timeout=2\nimport time\ntime.sleep(60)")
    assert out["error"]["ename"] == "RankTimeoutError"
    assert kernel.run(f"{POOL}\nfabric.global_rank")["result"] == "0"


MISMATCHED = f"""{POOL}{{flags}}
import torch
print("waiting", flush=True)
if fabric.global_rank == 0:
    fabric.barrier()
else:
    fabric.all_reduce(torch.ones(3))"""


@pytest.mark.parametrize("stop", ["interrupt", "timeout"])
def test_ranks_all_waiting_in_collectives_their_peers_never_make_are_stopped_and_the_pool_stays(kernel, stop):
    """No rank is outside a collective to leave the group and fail the others' (the commonest hang):
    each rank breaks its own, and the next cell meets in a new group with the names kept."""
    assert kernel.run(f"{POOL} --no-return\nkept_through = 40 + fabric.global_rank")["error"] is None
    started = time.monotonic()
    if stop == "interrupt":
        out, _ = kernel.run_interrupted(MISMATCHED.format(flags=""), when="[rank 1] waiting")
        assert out["error"]["ename"] == "KeyboardInterrupt", out["error"]
    else:
        out = kernel.run(MISMATCHED.format(flags=" --timeout=3"), timeout=120)
        assert out["error"]["ename"] == "RankTimeoutError", out["error"]
    took = time.monotonic() - started
    shown = out["stderr"] + "\n".join(out["error"]["traceback"])
    assert "rank 0: barrier at" in shown and "rank 1: all_reduce at" in shown, shown
    assert "the rank pool was ended" not in shown and "the ranks left their process group to stop" in out["stderr"], shown
    print(f"\nranks in mismatched collectives, {stop} -> the cell ended {took:.1f} s after it began")
    after = kernel.run(f"{POOL}\nprint('kept', kept_through)\nfabric.all_reduce(torch.tensor(1.0), reduce_op='sum').item()")
    assert after["error"] is None and after["result"] == "2.0" and "[rank 1] kept 41" in after["stdout"], after


def test_a_rank_failing_while_its_peer_waits_in_a_collective_frees_the_peer_and_the_pool_goes_on(kernel):
    out = kernel.run(f"{POOL}\nif fabric.global_rank == 1:\n    raise ValueError('no sum from me')\nfabric.all_reduce(torch.tensor(1.0), reduce_op='sum')")
    error = "\n".join(out["error"]["traceback"])
    assert "rank 1 failed: ValueError: no sum from me" in error
    assert "the ranks left their process group to stop" in out["stderr"]
    assert kernel.run(f"{POOL}\nfabric.all_reduce(torch.tensor(1.0), reduce_op='sum').item()")["result"] == "2.0"


@pytest.mark.parametrize("rank, call", [(0, "fabric.barrier()"), (1, "fabric.all_reduce(torch.tensor(5.0))")])
def test_a_collective_that_one_rank_never_reaches_ends_the_cell_and_the_pool_goes_on(kernel, rank, call):
    """No timeout: once the other rank has finished the cell, the one left waiting is named and the
    collective freed. (A rank at the end of a pool cell does not wait in a barrier, which would pair
    with a stray one and leave the peer waiting in the next.)"""
    started = time.monotonic()
    out = kernel.run(f"{POOL}\nimport torch\nif fabric.global_rank == {rank}:\n    {call}\nfabric.global_rank")
    assert time.monotonic() - started < 30
    assert out["error"]["ename"] == "UnreachedCollectiveError"
    name = call.split("(")[0].split(".")[1]
    assert out["error"]["evalue"].startswith(f"rank {rank} waits in {name} at Cell In[") and f"line 4: a collective that rank {1 - rank} will not take part in" in out["error"]["evalue"]
    assert kernel.run(f"{POOL}\nfabric.all_reduce(torch.ones(1), reduce_op='sum').item()")["result"] == "2.0"


def test_a_name_that_cannot_be_sent_is_named_before_anything_runs(kernel):
    kernel.run("import threading\nguard = threading.Lock()")
    out = kernel.run(f"{POOL}\nprint('ran', guard)")
    assert "ran" not in out["stdout"]
    assert "cannot send to the rank pool: guard" in out["stderr"]


def test_cells_that_ask_for_other_ranks_than_the_pool_are_refused(kernel):
    out = kernel.run("%%fabric --devices=3 --accelerator=cpu\nprint('ran')")
    assert "ran" not in out["stdout"] and "the rank pool has 2 rank(s) on cpu;" in out["stderr"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("%fabric start --engines=bogus", "choose from 'local', 'slurm', 'mpi', 'ssh'"),
        ("%fabric start --devices=2", "a rank pool is already up"),
        ("%fabric pull nothing_here --rank=7", "--rank=7 is not valid; choose 0 to 1"),
        ("%fabric push nothing_here", "the notebook has no nothing_here to send"),
        (f"{POOL} --debug\nprint('ran')", "--debug cannot check a rank pool's collectives"),
        (f"{POOL} --start-method=spawn --main-port=29999\nprint('ran')", "--start-method, --main-port cannot apply to a cell on the rank pool"),
        ("%%fabric --accelerator=cpu --devices=1 --num-nodes=2\nprint('ran')", "asks for 2 rank(s) on cpu on 2 nodes, but the rank pool has 2 rank(s) on cpu;"),
    ],
)
def test_bad_pool_commands_are_refused_and_start_nothing(kernel, line, message):
    before = set(engines(kernel))
    out = kernel.run(line)
    assert message in out["stderr"], out
    assert set(engines(kernel)) == before


def test_cells_after_one_that_ended_the_process_group_meet_in_a_new_one(kernel):
    """Scripts end with destroy_process_group(): the next cell on the pool joins a new group (rank 0's
    store of the old one is gone, so no rank meets there), and a model kept from before moves to it."""
    kernel.run(f"{POOL}\nkept = fabric.setup(torch.nn.Linear(2, 2))")
    ending = f"{POOL}\nimport torch.distributed as dist\nprint('sum', fabric.all_reduce(torch.ones(1), reduce_op='sum').item())\ndist.destroy_process_group()"
    for _ in range(5):
        out = kernel.run(ending, timeout=120)
        assert out["error"] is None and "[rank 0] sum 2.0" in out["stdout"], out
    out = kernel.run(f"{POOL}\nfabric.backward(kept(torch.ones(1, 2) * (fabric.global_rank + 1)).sum())\nprint('grad', kept.weight.grad.flatten().tolist())")
    assert out["error"] is None and "[rank 1] grad [1.5, 1.5, 1.5, 1.5]" in out["stdout"], out


@pytest.mark.parametrize("rank", [0, 1])
def test_pull_of_a_name_the_ranks_do_not_hold_says_so_and_binds_nothing(kernel, rank):
    out = kernel.run(f"nothing_here = 'the notebook keeps this'\n%fabric pull nothing_here --rank={rank}\nnothing_here")
    assert out["error"] is None, out
    assert out["stderr"].strip() == f"nothing_here was not brought back from rank {rank}: not defined there", out
    assert "'the notebook keeps this'" in out["result"], out


@pytest.mark.parametrize("rank", [0, 1])
def test_pull_of_a_value_that_cannot_be_pickled_names_it_and_why_and_a_none_comes_back(kernel, rank):
    bound = kernel.run(
        f"{POOL} --no-return\nclass Sealed:\n    def __reduce__(self):\n        raise RuntimeError('sealed')\nsealed = Sealed()\nempty = None"
    )
    assert bound["error"] is None, bound
    out = kernel.run(f"sealed = 'the notebook keeps this'\n%fabric pull sealed --rank={rank}\nsealed")
    assert out["error"] is None, out
    assert out["stderr"].strip() == f"sealed was not brought back from rank {rank}: cannot be pickled: RuntimeError: sealed", out
    assert "'the notebook keeps this'" in out["result"], out
    out = kernel.run(f"empty = 'before'\n%fabric pull empty --rank={rank}\nempty is None")
    assert out["error"] is None and out["stderr"] == "" and out["result"] == "True", out


@pytest.mark.parametrize("lost", [0, 1])
def test_a_lost_rank_breaks_the_pool_and_stop_leaves_nothing(kernel, lost):
    """The other rank waits in a collective, which fails as the engine goes: both end at once."""
    out = kernel.run(f"{POOL}\nimport os, signal, time\nif fabric.global_rank == {lost}:\n    time.sleep(1)\n    os.kill(os.getpid(), signal.SIGKILL)\nfabric.all_reduce(torch.ones(1))")
    assert out["error"]["ename"] == "RankError", out["error"]
    error = "\n".join(out["error"]["traceback"])
    assert f"rank {lost} failed: engine lost" in error
    assert "task" not in error, error  # ipyparallel's task ids mean nothing here
    assert "the rank pool was ended" in out["stderr"]
    refused = kernel.run(f"{POOL}\nprint('ran')")
    assert "ran" not in refused["stdout"] and "the rank pool is broken" in refused["stderr"]
    assert kernel.run("%fabric start --devices=2", timeout=180)["error"] is None
    again = kernel.run(f"{POOL}\nfabric.world_size")
    assert again["result"] == "2", again
    assert "stopped: no engine is left" in kernel.run("%fabric stop-pool")["stdout"]
    kernel.assert_no_ranks_left(grace=15)


def test_a_rank_that_crashed_is_named_with_its_signal_and_what_the_other_printed_reaches_the_cell(kernel):
    code = f"{POOL}\nimport ctypes, time\nprint('last words', fabric.global_rank, flush=True)\nif fabric.global_rank == 0:\n    ctypes.string_at(0)\ntime.sleep(5)"
    out = kernel.run(code, timeout=120)
    assert out["error"]["ename"] == "RankError" and "rank 0 failed: engine lost" in out["error"]["evalue"], out
    assert "was killed by SIGSEGV while the run went on" in out["error"]["evalue"], out
    assert "\nstopped: rank 1" in out["error"]["evalue"], out  # with the pool, as forked ranks are stopped
    assert "[rank 1] last words 1" in out["stdout"], out
    assert kernel.run("%fabric stop-pool")["error"] is None
    kernel.assert_no_ranks_left(grace=15)


def test_with_cuda_initialised_in_the_kernel_fork_points_to_a_pool_which_runs_the_cell(kernel_without_pool):
    kernel = kernel_without_pool
    kernel.run("real_is_initialized = torch.cuda.is_initialized\ntorch.cuda.is_initialized = lambda: True")
    try:
        refused = kernel.run("%%fabric --accelerator=cpu --devices=2 --no-widgets\nprint('forked')")
        assert refused["error"]["ename"] == "ForkUnsafeError"
        assert "%fabric start --engines=local" in refused["error"]["evalue"]
        assert kernel.run("%fabric start --devices=2 --engines=local", timeout=180)["error"] is None
        out = kernel.run(f"{POOL}\nfabric.all_reduce(torch.tensor(1.0), reduce_op='sum').item()")
        assert out["result"] == "2.0", out
    finally:
        kernel.run("torch.cuda.is_initialized = real_is_initialized\n%fabric stop-pool")


def test_attach_uses_engines_started_elsewhere_and_leaves_them_running(kernel_without_pool):
    kernel = kernel_without_pool
    kernel.run(
        "import ipyparallel, logging\n"
        "outside = ipyparallel.Cluster(n=2, cluster_id='nbfabric-attach-test', controller_ip='127.0.0.1', log_level=logging.ERROR)\n"
        "outside.start_cluster_sync()"
    )
    try:
        out = kernel.run("%fabric attach --cluster-id=nbfabric-attach-test", timeout=120)
        assert out["error"] is None and "rank pool of 2 ranks (attached engines" in out["stdout"], out
        assert kernel.run(f"{POOL}\nfabric.all_reduce(torch.tensor(3.0), reduce_op='sum').item()")["result"] == "6.0"
        assert "detached; its engines keep running" in kernel.run("%fabric stop-pool")["stdout"]
        assert kernel.run("len(outside.connect_client_sync().ids)")["result"] == "2"
    finally:
        kernel.run("outside.stop_cluster_sync()")
    kernel.assert_no_ranks_left(grace=15)


REPLICAS = """{pool} --strategy=ddp
def replicas():
    \"\"\"Per rank: the sum of the weights and of the optimizer's momentum, as float64.\"\"\"
    weights = sum(float(p.detach().double().sum()) for p in drift_model.parameters())
    momentum = sum(float(s["momentum_buffer"].double().sum()) for s in drift_opt.state.values())
    return fabric.all_gather(torch.tensor([weights, momentum], dtype=torch.float64)).tolist()
"""


def test_ddp_replicas_that_a_stop_left_apart_are_equal_again_in_the_next_cell(kernel):
    """A stop can cut an optimizer step short on one rank (SGD updates one parameter after
    another): here rank 1 has changed some weights and momentum when its cell fails. The next cell
    goes on with rank 0's model and optimizer state on every rank, not with replicas apart."""
    setup = kernel.run(
        f"{POOL} --strategy=ddp\ntorch.manual_seed(0)\nnet = torch.nn.Linear(8, 4)\n"
        "drift_model, drift_opt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))\n"
        "fabric.backward(drift_model(torch.randn(16, 8)).pow(2).mean()); drift_opt.step(); drift_opt.zero_grad()",
        timeout=300,
    )
    assert setup["error"] is None, setup["error"]
    kernel.run(REPLICAS.format(pool=POOL))
    before = eval(kernel.run(f"{POOL}\nreplicas()")["result"])
    assert before[0] == before[1]
    half_step = kernel.run(
        f"{POOL}\nif fabric.global_rank == 1:\n    with torch.no_grad():\n"
        "        drift_model.module.weight += 1.0\n        drift_opt.state[drift_model.module.weight]['momentum_buffer'] += 1.0\n"
        "    raise ValueError('stopped half way through a step')"
    )
    assert half_step["error"]["ename"] == "RankError"
    after = eval(kernel.run(f"{POOL}\nreplicas()")["result"])
    assert after[0] == after[1] == before[0]
