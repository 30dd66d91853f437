"""`%%fabric` and `%fabric` in a real Jupyter kernel, driven through jupyter_client."""

from __future__ import annotations

import asyncio
import queue
import re
import textwrap
import threading
import time

import pytest
from kernels import KernelProcess

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)


class Kernel(KernelProcess):
    """Runs code in one kernel (text output, no saved settings) and returns what the cell showed."""

    def __init__(self, settings_file):
        super().__init__(settings_file)
        self.run("%load_ext nbfabric\n%fabric --no-widgets\nimport torch")

    def run(self, code: str, timeout: float = 120, on_output=None) -> dict:
        """`on_output(outputs)`, if given, is called with what the cell showed so far after each message."""
        outputs = {"stdout": "", "stderr": "", "result": None, "error": None, "displays": []}

        def collect(message):
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                outputs[content["name"]] += content["text"]
            elif kind == "execute_result":
                outputs["result"] = content["data"]["text/plain"]
            elif kind == "error":
                outputs["error"] = content
            elif kind in ("display_data", "update_display_data"):
                outputs["displays"].append(content["data"].get("text/plain", ""))
            if on_output is not None:
                on_output(outputs)

        reply = self.client.execute_interactive(textwrap.dedent(code), output_hook=collect, timeout=timeout)
        outputs["pages"] = "".join(p.get("data", {}).get("text/plain", "") for p in reply["content"].get("payload", []))
        return outputs

    def run_interrupted(self, code: str, when: str) -> tuple[dict, float]:
        """Run `code`, interrupting the kernel once `when` appears in its stdout (the cell is running
        then, however slow the machine): what it showed, and the seconds from the interrupt to its end."""
        interrupted: list[float] = []

        def interrupt_once(outputs: dict) -> None:
            if not interrupted and when in outputs["stdout"]:
                interrupted.append(time.monotonic())
                self.interrupt()

        out = self.run(code, on_output=interrupt_once)
        assert interrupted, f"{when!r} never appeared: {out}"
        return out, time.monotonic() - interrupted[0]



@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    kernel = Kernel(tmp_path_factory.mktemp("settings") / "none.json")
    yield kernel
    kernel.close()


@pytest.fixture(autouse=True)
def no_rank_left(kernel):
    yield
    kernel.assert_no_ranks_left()


CPU2 = "%%fabric --accelerator=cpu --devices=2"


def test_lines_from_both_ranks_are_tagged_with_stderr_apart(kernel):
    out = kernel.run(
        f"""
        {CPU2}
        import os, sys
        print("hello from", fabric.global_rank)
        print("warning from", fabric.global_rank, file=sys.stderr)
        os.write(1, f"fd {{fabric.global_rank}}\\n".encode())
        """
    )
    assert out["error"] is None, out["error"]
    for rank in (0, 1):
        assert f"[rank {rank}] hello from {rank}\n" in out["stdout"]
        assert f"[rank {rank}] fd {rank}\n" in out["stdout"]
        assert f"[rank {rank}] warning from {rank}\n" in out["stderr"]


def test_each_display_of_a_rank_follows_a_line_that_tags_it_with_its_rank(kernel):
    out = kernel.run(
        f"{CPU2}\nimport time\nif fabric.global_rank == 0: time.sleep(0.5)\ndisplay({{'computed on rank': fabric.global_rank}})"
    )
    assert out["error"] is None and out["displays"] == ["{'computed on rank': 1}", "{'computed on rank': 0}"], out
    assert out["stdout"] == "[rank 1] \n[rank 0] \n", out


def test_ranks_flag_shows_only_rank_zero_but_the_record_keeps_all(kernel):
    out = kernel.run(f"{CPU2} --ranks 0 --out run\nprint('from', fabric.global_rank)")
    assert "[rank 0] from 0" in out["stdout"] and "rank 1" not in out["stdout"]
    assert kernel.run("run.output(rank=1)")["result"] == "'from 1'"


def test_progress_updates_in_place_and_its_last_line_is_written_over_it(kernel):
    """As a terminal shows a bar: the line that ends it takes its place, and no stale state of the
    bar stays next to it; a later bar has a display of its own."""
    out = kernel.run(
        f"{CPU2} --ranks 0 --no-widgets\nimport sys, time\nfor p in (10, 60):\n    sys.stderr.write(f'\\r{{p}}%')\n    time.sleep(0.6)\nsys.stderr.write('\\n')"
        "\nprint('between')\nsys.stderr.write('\\rsecond 5%\\rsecond 50%')\ntime.sleep(0.6)\nsys.stderr.write('\\rsecond done\\n')"
    )
    assert out["displays"] == ["[rank 0] 10%", "[rank 0] 60%", "[rank 0] second 5%", "[rank 0] second done"], out
    assert out["stderr"] == "" and out["stdout"].startswith("[rank 0] between\n"), out


def test_names_and_the_last_expression_come_back_trained_and_on_cpu(kernel):
    kernel.run("model = torch.nn.Linear(4, 1); before = model.weight.detach().clone()")
    out = kernel.run(
        f"""
        {CPU2}
        model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.5))
        loader = (i for i in range(3))
        for _ in range(3):
            loss = model(torch.ones(8, 4)).pow(2).mean()
            optimizer.zero_grad(); fabric.backward(loss); optimizer.step()
        fabric.world_size * 21
        """
    )
    assert out["error"] is None, out["error"]
    assert out["result"] == "42"
    assert "not brought back from rank 0: loader (cannot be pickled" in out["stderr"]
    check = kernel.run(
        "(type(model).__name__, model.weight.device.type, bool((model.weight != before).any()), "
        "optimizer.param_groups[0]['params'][0] is model.weight)"
    )
    assert check["result"] == "('Linear', 'cpu', True, True)"


def test_a_set_up_loader_comes_back_as_the_one_given_alone_or_inside_another_value(kernel):
    kernel.run("from torch.utils.data import DataLoader, TensorDataset\nds = TensorDataset(torch.arange(10.))")
    out = kernel.run(
        f"""
        {CPU2}
        loader = fabric.setup_dataloaders(DataLoader(ds, batch_size=2))
        loaders = {{"train": loader}}
        seen = sum(len(batch) for batch, in loader)
        """
    )
    assert out["error"] is None and out["stderr"] == "", out
    check = kernel.run("(seen, [x for b, in loader for x in b.int().tolist()], type(loader).__name__, loaders['train'] is loader)")
    assert check["result"] == "(5, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 'DataLoader', True)"


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_what_the_cell_changes_in_place_or_rebinds_through_a_function_comes_back_as_a_plain_cell_would_leave_it(kernel, start):
    kernel.run(
        """
        losses, stats, history = [], {}, []
        model = torch.nn.Linear(2, 1); before = model.weight.detach().clone()
        best = None
        def note(x):
            global best
            best = x
            history.append(x)
        """
    )
    out = kernel.run(
        f"""
        {CPU2} --start-method={start}
        losses.append(fabric.global_rank + 1.0)
        stats["best"] = 3
        trained = fabric.setup(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
        fabric.backward(trained(torch.ones(4, 2)).sum()); optimizer.step()
        note(7)
        """
    )
    assert out["error"] is None and out["stderr"] == "", out
    check = kernel.run(
        "(losses, stats, bool((model.weight != before).any()), trained is model, "
        "optimizer.param_groups[0]['params'][0] is model.weight, best, history)"
    )
    # a spawned rank's copy of a notebook function has globals of its own (what it rebinds or
    # changes there stays there); a forked rank's is the notebook's
    assert check["result"] == "([1.0], {'best': 3}, True, True, True, " + ("7, [7])" if start == "fork" else "None, [])")


def test_an_unpicklable_name_is_named_and_every_other_name_comes_back_exactly(kernel):
    out = kernel.run(
        f"""
        {CPU2}
        import threading
        shared = {{"k": "v"}}
        first = [1, 2]
        batches = (n for n in range(3))
        pair = [shared, shared]
        lock = threading.Lock()
        last = "end"
        (pair, fabric.world_size)
        """
    )
    assert out["error"] is None, out["error"]
    assert "batches (cannot be pickled" in out["stderr"] and "lock (cannot be pickled" in out["stderr"]
    assert out["result"] == "([{'k': 'v'}, {'k': 'v'}], 2)"
    check = kernel.run("(first, pair, pair[0] is pair[1] is shared, last)")
    assert check["result"] == "([1, 2], [{'k': 'v'}, {'k': 'v'}], True, 'end')"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_run_flags_and_runs_nothing(kernel, flag):
    for magic in (f"%fabric {flag}", f"%%fabric {flag}\nprint('the cell body ran')"):
        out = kernel.run(magic)
        assert out["error"] is None, out["error"]
        assert "--devices DEVICES" in out["stdout"] and "--timeout TIMEOUT" in out["stdout"] and "the cell body ran" not in out["stdout"]


def test_a_fabric_cell_inside_a_fabric_cell_is_refused_on_the_ranks(kernel):
    out = kernel.run(f"{CPU2}\nget_ipython().run_cell_magic('fabric', '--devices=2', 'inner = 1')")
    assert out["error"]["ename"] == "RankError" and "cannot run inside the ranks of another" in "\n".join(out["error"]["traceback"])
    assert "left the run" not in out["stderr"] and kernel.run("'inner' in globals()")["result"] == "False"


def test_a_syntax_error_shows_the_cell_s_line_without_nbfabric_s_parsing_and_an_open_file_is_named_not_converted(kernel):
    out = kernel.run(f"{CPU2}\nx = (1,\nprint(x)")
    shown = "\n".join(out["error"]["traceback"])
    assert out["error"]["ename"] == "SyntaxError" and "was never closed" in shown
    assert "cell.py" not in shown and "ast.py" not in shown
    out = kernel.run(f"{CPU2}\nfh = open({__file__!r})")
    assert "fh (cannot be pickled: PicklingError: an open file stays in the rank)" in out["stderr"], out
    assert "NameError" in (kernel.run("fh")["error"] or {}).get("ename", "")


def test_return_and_no_return_choose_what_comes_back(kernel):
    kernel.run("a = b = 0")
    kernel.run(f"{CPU2} --return a\na = 1\nb = 1")
    assert kernel.run("(a, b)")["result"] == "(1, 0)"
    kernel.run(f"{CPU2} --no-return\na = 2")
    assert kernel.run("a")["result"] == "1"
    kernel.run(f"{CPU2} --return=_hidden,a\n_hidden = 3\na = 4")  # a private name, asked for, comes back too
    assert kernel.run("(_hidden, a)")["result"] == "(3, 4)"


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_names_the_cell_deletes_are_deleted_in_the_notebook(kernel, start):
    """`del` on rank 0 reaches the notebook as its other names do, forked or spawned (where the
    name need not travel to be deleted); --return names what comes back, so nothing is deleted."""
    kernel.run("gone = object(); kept = 1; rebound = 1; unreached = 1; fabric = 'the notebook s own'")
    out = kernel.run(f"{CPU2} --start-method={start}\ndel gone\nrebound = 2\ndel rebound\nrebound = 3\nif False:\n    del unreached\ndel fabric")
    assert out["error"] is None and "not brought back" not in out["stderr"], out
    assert kernel.run("sorted(name for name in ('gone', 'kept', 'rebound', 'unreached') if name in globals())")["result"] == "['kept', 'rebound', 'unreached']"
    assert kernel.run("rebound")["result"] == "3"
    assert kernel.run("fabric")["result"] == "'the notebook s own'"  # the cell's fabric is its own
    kernel.run("del fabric")
    kernel.run(f"{CPU2} --start-method={start} --return kept\ndel kept")
    assert kernel.run("kept")["result"] == "1"


def test_a_class_defined_in_the_cell_comes_back_with_its_instances(kernel):
    kernel.run(
        f"""
        {CPU2}
        class Scaled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.scale = torch.nn.Parameter(torch.tensor(2.0))
            def forward(self, x):
                return x * self.scale
        net = Scaled()
        """
    )
    assert kernel.run("(isinstance(net, Scaled), net(torch.tensor(3.0)).item())")["result"] == "(True, 6.0)"


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_function_from_the_cell_reads_the_notebook_globals_afterwards(kernel, start):
    out = kernel.run(
        f"""
        {CPU2} --start-method={start}
        SCALE = 3
        def helper(x):
            return x * SCALE
        class Doubler:
            def __call__(self, x):
                return 2 * helper(x)
        helper(2)
        """
    )
    assert out["error"] is None, out["error"]
    assert out["result"] == "6"
    assert kernel.run("(helper(2), Doubler()(2))")["result"] == "(6, 12)"
    kernel.run("SCALE = 5")  # as for a function defined in a plain cell, the notebook's value counts now
    assert kernel.run("(helper(2), Doubler()(2), helper.__globals__ is globals())")["result"] == "(10, 20, True)"


def test_logged_metrics_reach_the_run_record(kernel):
    kernel.run(f"{CPU2} --out run\nfor step in range(3):\n    fabric.log('loss', 1.0 / (step + 1) + fabric.global_rank, step=step)")
    assert kernel.run("run.metrics['loss']")["result"] == "[1.0, 0.5, 0.3333333333333333]"
    assert kernel.run("run.metrics.by_rank('loss')[1]")["result"] == "[2.0, 1.5, 1.3333333333333333]"
    assert kernel.run("run.returncodes == {0: 0, 1: 0}")["result"] == "True"


def test_a_failing_rank_shows_its_cell_line_and_the_next_cell_runs(kernel):
    out = kernel.run(f"{CPU2}\nx = 1\nif fabric.global_rank == 1:\n    raise ValueError('broken on purpose')\nfabric.barrier()")
    error = out["error"]
    assert error["ename"] == "RankError"
    traceback = "\n".join(error["traceback"])
    assert "rank 1 failed: ValueError: broken on purpose" in traceback
    assert "raise ValueError('broken on purpose')" in traceback
    assert "Cell In[" in traceback and ", line 4, in <module>" in traceback  # the %%fabric line counts, as in IPython
    assert "nbfabric/launcher" not in traceback and "ipykernel_" not in traceback
    assert kernel.run(f"{CPU2}\nfabric.world_size")["result"] == "2"


def test_the_notebook_interrupt_stops_every_rank_and_keeps_the_kernel(kernel):
    out, seconds = kernel.run_interrupted(f"{CPU2}\nimport time\nprint('working', flush=True)\ntime.sleep(120)", when="[rank 0] working")
    assert seconds < 60
    assert out["error"]["ename"] == "KeyboardInterrupt"
    assert "[rank 0] working" in out["stdout"]
    assert kernel.run("1 + 1")["result"] == "2"



def test_an_interrupt_while_the_first_cell_prepares_the_ranks_leaves_the_kernel_working(tmp_path):
    """The first cell imports, in the kernel, what every rank would import (torch._dynamo, about
    2 s); an interrupt in the middle left it half-imported, and every later cell failed."""
    fresh = Kernel(tmp_path / "none.json")
    try:
        fresh.run(
            """
            import os, signal, sys
            class InterruptDuringImport:  # Jupyter's interrupt, landing while torch._dynamo loads
                def find_spec(self, name, path=None, target=None):
                    if name == "torch.distributed._symmetric_memory":  # one of the modules it loads
                        sys.meta_path.remove(self)
                        os.kill(os.getpid(), signal.SIGINT)
                    return None
            sys.meta_path.insert(0, InterruptDuringImport())
            """
        )
        out = fresh.run(f"{CPU2}\nprint('ran')")
        assert out["error"]["ename"] == "KeyboardInterrupt" and "ran" not in out["stdout"]
        out = fresh.run(f"{CPU2}\nmodel = fabric.setup(torch.nn.Linear(2, 1))\nprint('hello', fabric.global_rank)")
        assert out["error"] is None, out["error"]
        assert "[rank 0] hello 0" in out["stdout"] and "[rank 1] hello 1" in out["stdout"]
    finally:
        fresh.close()


def test_magics_and_shell_commands_run_in_forked_ranks_and_spawned_ranks_refuse_them_before_starting(kernel):
    code = "!echo shell says hi\n%time x = 1 + fabric.global_rank\nprint('x is', x)"
    out = kernel.run(f"{CPU2}\n{code}", timeout=60)
    assert out["error"] is None, out
    for rank in (0, 1):
        assert f"[rank {rank}] shell says hi" in out["stdout"] and f"[rank {rank}] x is {1 + rank}" in out["stdout"], out
    assert kernel.run("x")["result"] == "1"
    out = kernel.run(f"{CPU2} --start-method=spawn\nimport os\nprint('started')\n!echo hi", timeout=60)
    assert "started" not in out["stdout"] and "spawned ranks, plain Python processes, do not have" in out["stderr"], out
    assert "run it with --start-method=fork or on a rank pool" in out["stderr"], out


def test_spawned_ranks_draw_the_random_numbers_forked_ranks_draw_after_the_notebook_seeds(kernel):
    drawn = {}
    for start in ("fork", "spawn"):
        kernel.run("import numpy\ntorch.manual_seed(5)\nnumpy.random.seed(5)")  # (Python's random is seeded anew in a forked child)
        out = kernel.run(f"{CPU2} --start-method={start}\nprint('drew', torch.rand(2).tolist(), numpy.random.rand())", timeout=120)
        assert out["error"] is None, out
        drawn[start] = sorted(line.split("] ", 1)[1] for line in out["stdout"].splitlines() if "drew" in line)
    assert drawn["spawn"] == drawn["fork"] and len(set(drawn["fork"])) == 1, drawn


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_thread_pool_left_open_in_a_cell_ends_with_the_rank_as_in_a_script(kernel, start):
    code = "from concurrent.futures import ThreadPoolExecutor\nexecutor = ThreadPoolExecutor(2)\nprint('got', executor.submit(lambda: 6 * 7).result())"
    out = kernel.run(f"{CPU2} --start-method={start} --no-return\n{code}", timeout=60)
    assert out["error"] is None and "[rank 0] got 42" in out["stdout"] and "[rank 1] got 42" in out["stdout"], out


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_input_in_a_rank_fails_at_once_saying_why_instead_of_waiting_for_the_kernel(kernel, start):
    code = "import getpass\nname = input('name? ') if fabric.global_rank == 0 else getpass.getpass()"
    out = kernel.run(f"{CPU2} --start-method={start}\n{code}", timeout=60)
    assert out["error"]["ename"] == "RankError"
    message = "EOFError: a rank has no input for input() or getpass() to read: ask before the ranks start (in the notebook, before the %%fabric cell)"
    assert out["error"]["evalue"].startswith(f"rank 0 failed: {message}") or out["error"]["evalue"].startswith(f"rank 1 failed: {message}")



def test_an_interrupted_wait_stops_the_waiting_and_the_background_run_goes_on(kernel):
    kernel.run(f"{CPU2} --background --no-widgets\nimport time\nfor step in range(600):\n    time.sleep(0.1)\nfinished = step")
    try:
        timer = threading.Timer(2.0, kernel.interrupt)
        timer.start()
        out = kernel.run("%fabric wait", timeout=60)
        timer.join()
        assert out["error"]["ename"] == "KeyboardInterrupt", out
        assert "stopped waiting; the background run of cell" in out["error"]["evalue"], out["error"]
        assert "goes on: %fabric wait waits for it again, %fabric stop ends it" in out["error"]["evalue"], out["error"]
        where = kernel.run("%fabric where")["stdout"]
        assert "rank 0: time.sleep at Cell In" in where and "rank 1: time.sleep at Cell In" in where, where
    finally:
        assert kernel.run("%fabric stop", timeout=60)["error"] is None
    kernel.assert_no_ranks_left()


def test_a_failed_background_run_says_so_in_its_cell_at_once_and_later_as_an_error(kernel):
    kernel.run(f"{CPU2} --background\nraise ValueError('failed in the background')")
    seen, deadline = "", time.monotonic() + 60
    while "%fabric wait shows the whole error" not in seen and time.monotonic() < deadline:
        try:
            message = kernel.client.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if message["msg_type"] == "stream":
            seen += message["content"]["text"]
    assert re.search(r"the background run of cell \[\d+\] \(.*\) failed: RankError: rank \d failed: ValueError: failed in the background\n", seen), seen
    out = kernel.run(f"{CPU2}\nprint('next run')")
    assert re.search(r"dropping the unwaited error \(RankError: rank \d failed: ValueError: failed in the background\) of the background run", out["stderr"])
    assert "[rank 0] next run" in out["stdout"]


def test_a_rank_that_leaves_by_sys_exit_is_shown_at_its_cell_line(kernel):
    out = kernel.run(f"{CPU2}\nimport sys\nif fabric.global_rank == 1:\n    sys.exit(0)\nprint('stayed')")
    assert out["error"] is None, out["error"]
    assert re.search(r"\[rank 1\] left the run: sys.exit\(0\) at Cell In\[\d+\], line 4\n", out["stderr"]), out["stderr"]
    assert "[rank 0] stayed" in out["stdout"]


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_when_rank_0_leaves_by_sys_exit_the_cell_says_that_nothing_came_back(kernel, start):
    out = kernel.run(f"{CPU2} --start-method={start}\nimport sys\nbound_before_leaving = 1\nif fabric.global_rank == 0:\n    sys.exit(0)\nprint('stayed')")
    assert out["error"] is None, out["error"]
    assert re.search(r"\[rank 0\] left the run: sys.exit\(0\) at Cell In\[\d+\], line 5\n", out["stderr"]), out["stderr"]
    assert "nothing was brought back: rank 0 left the run (sys.exit) before the cell's names were sent" in out["stderr"]
    assert "[rank 1] stayed" in out["stdout"]
    assert kernel.run("'bound_before_leaving' in globals()")["result"] == "False"

@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--devices=2 --bogus=1", "unrecognized arguments: --bogus=1"),
        ("--precision=17", "choose one of 32-true, 16-mixed"),
        ("--accelerator=tpu", "choose one of"),
        ("--devices=2 --ranks=5", "--ranks='5' is not valid"),
        ("--return a --no-return", "exclude each other"),
        ("--devices=2 --strategy=ddp_spawn --start-method=fork", "conflicts with start_method='fork'"),
        ("--devices=2 --out=1bad", "--out takes a Python name, such as run; '1bad' is not one"),
        ("--devices=2 --out=class", "--out takes a Python name, such as run; 'class' is not one"),
        ("--devices=2 --return=model,1x", "--return takes Python names, such as model or model,losses; '1x' is not one"),
        ("--devices=2 --return=", "--return needs the names to bring back"),
        ("--devices=2 --return=,", "--return needs the names to bring back"),
        ("--devices=2 --return=fabric", "the cell's fabric belongs to its ranks"),
        ("--devices=2 --return='a b'", "is not a flag, nor one of stop, wait, where; several names go as one flag, such as --return=model,losses"),
    ],
)
def test_bad_flags_are_refused_before_anything_starts(kernel, flags, message):
    out = kernel.run(f"%%fabric --accelerator=cpu {flags}\nprint('ran')")
    assert "ran" not in out["stdout"]
    assert "UsageError: " in out["stderr"] and message in out["stderr"], out["stderr"]


def test_a_word_the_line_magic_does_not_know_is_named_with_every_command(kernel):
    out = kernel.run("%fabric bogus")
    assert "UsageError: 'bogus' is not a flag, nor one of stop, wait, where, start, attach, pool, stop-pool, pull, push;" in out["stderr"], out["stderr"]


def test_line_magic_sets_defaults_for_later_cells_and_shows_them(kernel):
    out = kernel.run("%fabric --accelerator=cpu --devices=2")
    assert "%%fabric defaults: --accelerator=cpu --devices=2 --strategy=ddp --precision=32-true" in out["stdout"]
    assert "CPU cores" in out["stdout"]
    try:
        assert kernel.run("%%fabric\nfabric.world_size")["result"] == "2"
        assert kernel.run("%%fabric --devices=1\nfabric.world_size")["result"] == "1"
    finally:
        kernel.run("%fabric --devices=1")


def test_help_is_generated_from_the_flags(kernel):
    text = kernel.run("%%fabric?")["pages"]
    assert "--devices" in text and "--no-return" in text and "--out" in text


def test_spawn_ships_notebook_functions_with_the_globals_they_reach(kernel):
    kernel.run(
        """
        HIDDEN, SCALE = 3, 2.0
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(HIDDEN, 1)
        def make_model():
            return Net()
        class Doubled(torch.utils.data.Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, index):
                return index * SCALE
        class Ambiguous:  # like a pandas Series: no truth value, == is elementwise
            def __bool__(self):
                raise ValueError("The truth value of a Series is ambiguous")
            def __eq__(self, other):
                return self
            __hash__ = object.__hash__
        frame = Ambiguous()
        """
    )
    out = kernel.run(f"{CPU2} --start-method=spawn\n(make_model().layer.in_features, Doubled()[3], type(frame).__name__)")
    assert out["error"] is None, out["error"]
    assert out["result"] == "(3, 6.0, 'Ambiguous')"


def test_spawn_refuses_a_name_it_cannot_send_before_any_rank_starts(kernel):
    kernel.run("import threading\nlock = threading.Lock()")
    out = kernel.run(f"{CPU2} --start-method=spawn --out refused\nprint('ran', lock)")
    assert "ran" not in out["stdout"] and "refused" not in kernel.run("dir()")["result"]
    assert "cannot send to the spawned ranks: lock" in out["stderr"] and "cannot pickle '_thread.lock' object" in out["stderr"]


def test_spawn_ships_the_values_the_cell_reads(kernel):
    kernel.run("scale = 3")
    out = kernel.run(
        f"{CPU2} --start-method=spawn\ntotal = fabric.all_reduce(torch.tensor(float(scale)), reduce_op='sum').item()\ntotal * 2"
    )
    assert out["error"] is None, out["error"]
    assert out["result"] == "12.0"
    assert kernel.run("total")["result"] == "6.0"


def test_two_notebooks_join_as_two_nodes(kernel, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    other = Kernel(tmp_path / "none.json")
    cell = (
        "%%fabric --accelerator=cpu --devices=2 --num-nodes=2 --node-rank={node} --main-address=127.0.0.1 "
        f"--main-port={port} --run-key=4d8e2a6c0f1b3957e4a2c6d8b0f13579 --timeout=120\n"
        "total = fabric.all_reduce(torch.tensor(fabric.global_rank + 1.0), reduce_op='sum').item()\n"
        "(fabric.node_rank, fabric.world_size, total)"
    )
    results = {}
    try:
        def second_node():
            try:
                results["second"] = other.run(cell.format(node=1))
            finally:
                asyncio.get_event_loop().close()  # the loop jupyter_client made for this thread, and its fds

        worker = threading.Thread(target=second_node)
        worker.start()
        results["first"] = kernel.run(cell.format(node=0))
        worker.join(180)
    finally:
        other.close()
    assert results["first"]["result"] == "(0, 4, 10.0)", results["first"]
    assert results["second"]["error"] is None, results["second"]["error"]
    assert results["second"]["result"] is None  # values come back from global rank 0 only
    assert kernel.run("total")["result"] == "10.0"


def test_a_node_rank_outside_the_nodes_is_refused_and_changes_nothing(kernel):
    out = kernel.run("%%fabric --accelerator=cpu --devices=2 --num-nodes=2 --node-rank=2 --main-port=1234 --out refused\nprint('ran')")
    assert "ran" not in out["stdout"] and "--node-rank=2 is not valid with --num-nodes=2; choose 0 to 1" in out["stderr"]
    assert kernel.run("'refused' in globals()")["result"] == "False"


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf"])
def test_a_timeout_that_is_not_a_positive_number_is_refused_before_any_rank_starts(kernel, timeout):
    out = kernel.run(f"{CPU2} --timeout={timeout}\nprint('ran')")
    assert "ran" not in out["stdout"]
    assert f"timeout={timeout} is not valid; give a number of seconds above 0" in out["stderr"]
