"""The hardware picker and the run dashboard: their logic in this process, then in a real kernel."""

from __future__ import annotations

import json
import re
import textwrap
import time
from types import SimpleNamespace

import pytest
from kernels import KernelProcess

from nbfabric import Fabric, RankError
from nbfabric.devices import GpuInfo, Hardware, detect_hardware
from nbfabric.notebook import chart
from nbfabric.notebook.dashboard import Dashboard
from nbfabric.launcher.usage import size
from nbfabric.notebook.tally import LOG_LINES, RunTally
from nbfabric.notebook.picker import Picker
from nbfabric.user_config import load_defaults

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


# ----------------------------------------------------------------- in this process
@pytest.fixture(scope="module")
def fonts_loaded():
    """matplotlib keeps the font files it opened; open them before a test counts file descriptors."""
    series = chart.MetricSeries()
    series.add(0, [("loss", 1.0, 0, 0.0)])
    chart.draw(series.series)


def _start(fabric, function, dashboard):
    """Run `function` on new rank processes, their output and events going to `dashboard`."""
    return fabric._launch(function, sink=dashboard, new_processes=True)


def _train(fabric):
    for step in range(5):
        fabric.log("loss", 1.0 / (step + 1) + fabric.global_rank, step=step)
    for i in range(LOG_LINES + 50):
        print(f"<line {i}> from {fabric.global_rank}")
    return fabric.world_size


def test_the_dashboard_shows_status_a_capped_log_and_a_chart(fonts_loaded, no_leaks):
    fabric = Fabric(accelerator="cpu", devices=2)
    dashboard = Dashboard(fabric.config)
    assert dashboard.rank_status == {0: ("starting", ""), 1: ("starting", "")}
    assert _start(fabric, _train, dashboard) == 2
    dashboard.finish(None)
    assert dashboard.state == "done"
    assert dashboard.rank_status == {0: ("done", ""), 1: ("done", "")}
    log = dashboard.log.value
    assert log.count("[rank ") == LOG_LINES
    assert f"&lt;line {LOG_LINES + 49}&gt; from " in log and "<line" not in log
    dashboard.log_filter.value = 1
    assert dashboard.log.value.count("[rank 1]") == LOG_LINES and "[rank 0]" not in dashboard.log.value
    assert f"&lt;line {LOG_LINES + 49}&gt; from 1" in dashboard.log.value
    rank_zero_chart = dashboard.chart.value
    assert png_size(rank_zero_chart) == (304, 200)
    dashboard.chart_ranks.value = True
    assert dashboard.chart.value != rank_zero_chart
    summary = dashboard.summary()
    assert "--devices=2" in summary and ": done after " in summary
    assert "rank 1: done (350 lines)" in summary and "loss=0.2 (step 4)" in summary
    assert f"[rank 0] <line {LOG_LINES + 49}> from 0" in summary and f"[rank 1] <line {LOG_LINES + 49}> from 1" in summary


def _fail_on_rank_one(fabric):
    if fabric.global_rank == 1:
        raise ValueError("broken on purpose")
    time.sleep(60)


def test_a_failed_rank_shows_its_reason_and_the_stopped_one(fonts_loaded, no_leaks):
    fabric = Fabric(accelerator="cpu", devices=2)
    dashboard = Dashboard(fabric.config)
    with pytest.raises(RankError) as raised:
        _start(fabric, _fail_on_rank_one, dashboard)
    dashboard.finish(raised.value)
    assert dashboard.state == "failed"
    assert dashboard.rank_status == {0: ("stopped", ""), 1: ("failed", "ValueError: broken on purpose")}
    assert "ValueError: broken on purpose" in dashboard.status.value
    assert "rank 1: failed: ValueError: broken on purpose" in dashboard.summary()


def _sleep(fabric):
    print("working", flush=True)
    time.sleep(60)


class _StopWhenWorking(Dashboard):
    """Requests a stop, as its Stop button does, once a rank says it is working: the ranks run then."""

    def line(self, rank, stream, text):
        super().line(rank, stream, text)
        if "working" in text and not self.stop_requested:
            self.requested_at = time.monotonic()
            self.request_stop()


def test_a_stop_request_ends_every_rank_like_an_interrupt(fonts_loaded, no_leaks):
    fabric = Fabric(accelerator="cpu", devices=2)
    dashboard = _StopWhenWorking(fabric.config)
    with pytest.raises(KeyboardInterrupt):
        _start(fabric, _sleep, dashboard)
    assert time.monotonic() - dashboard.requested_at < 15
    assert dashboard.stop_button.disabled
    dashboard.finish(KeyboardInterrupt())
    assert dashboard.state == "stopped"
    assert dashboard.rank_status == {0: ("stopped", ""), 1: ("stopped", "")}


class _WhereThenStop(Dashboard):
    """Presses Where once both ranks say they are working (again, until both are past the print),
    then Stop."""

    working = 0
    live_text = ""

    def line(self, rank, stream, text):
        super().line(rank, stream, text)
        self.working += "working" in text
        if self.working == 2:
            self.working += 1
            self.where_button.click()

    def places(self, places, *, live):
        super().places(places, live=live)
        if live:
            self.live_text = self.stacks.value
            if self.live_text.count("time.sleep at") == 2:
                self.request_stop()
            else:
                self.where_button.click()


def test_the_where_button_shows_each_ranks_line_and_a_stop_shows_it_again(fonts_loaded, no_leaks):
    fabric = Fabric(accelerator="cpu", devices=2)
    dashboard = _WhereThenStop(fabric.config)
    with pytest.raises(KeyboardInterrupt) as stopped:
        _start(fabric, _sleep, dashboard)
    line = 2 + next(n for n, text in enumerate(open(__file__).read().splitlines(), 1) if text == "def _sleep(fabric):")
    for rank in (0, 1):
        assert f"rank {rank}: time.sleep at {__file__}, line {line}" in dashboard.live_text
        assert f"rank {rank}: time.sleep at {__file__}, line {line}" in str(stopped.value)
    assert "Where the ranks were at " in dashboard.live_text
    assert "Where the ranks were when the run stopped" in dashboard.stacks.value
    dashboard.finish(stopped.value)
    assert dashboard.where_button.layout.display == "none"


class _WatchMemory(Dashboard):
    """Keeps rank 1's memory column at each measurement; lets rank 1 allocate once one is shown,
    and finish once a measurement shows the allocation."""

    def __init__(self, config, allocate, done):
        super().__init__(config)
        self.allocate, self.done, self.shown = allocate, done, []

    def usage(self, usage):
        super().usage(usage)
        if 1 in usage:
            self._render_text()
            self.shown.append((usage[1].rss, self.status.value))
            self.allocate.touch()
            if usage[1].rss - self.shown[0][0] >= 480 << 20:  # the allocation, measured from before it
                self.done.touch()


def _allocate_when_told(allocate, done):
    def train(fabric):
        while not allocate.exists():
            time.sleep(0.01)
        held = bytearray(500 << 20) if fabric.global_rank == 1 else None  # noqa: F841 - held to the end
        while not done.exists():
            time.sleep(0.01)

    return train


def test_the_memory_column_moves_when_a_rank_allocates_500_mb(fonts_loaded, no_leaks, tmp_path):
    fabric = Fabric(accelerator="cpu", devices=2)
    allocate, done = tmp_path / "allocate", tmp_path / "done"
    dashboard = _WatchMemory(fabric.config, allocate, done)
    _start(fabric, _allocate_when_told(allocate, done), dashboard)
    (first, first_html), (last, last_html) = dashboard.shown[0], dashboard.shown[-1]
    assert last - first >= 480 << 20
    assert size(first) in first_html and size(last) in last_html and "% CPU" in last_html
    dashboard.finish(None)
    assert f"rank 1: done (0 lines, peak {size(dashboard.tally.usage_peak[1].rss)})" in dashboard.summary()


def test_a_ranks_status_shows_its_progress_bar_until_the_line_that_ends_it():
    """The dashboard's status column shows a rank's live progress line; the line that ends it on the
    same stream (tqdm's last) replaces it, as a terminal shows it, not a line on the other stream."""
    tally = RunTally(2)
    tally.progress(0, "stderr", "epoch:  93%")
    tally.line(0, "stdout", "loss 0.5")
    assert tally.progress_text[0] == "epoch:  93%"
    tally.line(0, "stderr", "epoch: 100% 30/30")
    tally.line(0, "stderr", "a warning")
    assert tally.progress_text == {0: "epoch: 100% 30/30"}


def test_the_chart_has_one_panel_per_metric_and_skips_what_is_not_a_number():
    series = chart.MetricSeries()
    series.add(1, [("loss", 2.0, None, 0.0), ("loss", 1.5, None, 0.0), ("note", "text", 0, 0.0)])
    series.add(0, [("loss", 1.0, 10, 0.0), ("acc", 0.5, 10, 0.0)])
    assert series.series["loss"][1] == ([0, 1], [2.0, 1.5]) and "note" not in series.series
    assert series.shown(False) == {"loss": {0: ([10], [1.0])}, "acc": {0: ([10], [0.5])}}
    assert series.last_values() == {"loss": (10, 1.0), "acc": (10, 0.5)}
    assert png_size(chart.draw(series.shown(True))) == (608, 200)
    series.add(0, [("lr", 0.1, 1, 0.0), ("grad", 3.0, 1, 0.0)])
    assert png_size(chart.draw(series.shown(True))) == (912, 400)


GPUS = Hardware(cpu_count=8, gpus=(GpuInfo(0, "NVIDIA H100", 80 << 30), GpuInfo(1, "NVIDIA H100", 80 << 30)), mps=False)


def test_the_picker_offers_what_the_machine_has_and_applies_valid_choices(tmp_path):
    magics = SimpleNamespace(defaults={"timeout": 60})
    picker = Picker(magics, tmp_path / "defaults.json", hardware=GPUS)
    assert [value for _, value in picker.accelerator.options] == ["cuda", "cpu"]
    assert "NVIDIA H100 (80 GiB)" in picker.accelerator.options[0][0]
    assert picker.devices.value == "2" and "16-mixed" in picker.precision.options
    picker.devices.value = "1,"
    assert "<code>%%fabric --accelerator=cuda --devices=1, --strategy=single_device" in picker.magic_line.value
    assert "nbfabric run train.py --accelerator=cuda --devices=1," in picker.command.value
    assert magics.defaults == {"timeout": 60, "accelerator": "cuda", "devices": [1], "strategy": "auto", "precision": "32-true", "num_nodes": 1}
    picker.precision.value = "16-mixed"
    picker.accelerator.value = "cpu"
    assert "16-mixed" not in picker.precision.options and picker.precision.value == "32-true"
    assert "16-mixed&#x27; is not available on CPU" in picker.precision_note.value
    assert "lists GPU indices" in picker.error and picker.save_button.disabled
    assert magics.defaults["accelerator"] == "cuda"  # an invalid combination changes nothing
    picker.devices.value = "4"
    assert picker.error is None and magics.defaults["devices"] == 4 and magics.defaults["accelerator"] == "cpu"


def test_the_picker_saves_its_choice_and_keeps_other_saved_settings(tmp_path):
    path = tmp_path / "defaults.json"
    path.write_text(json.dumps({"start_method": "spawn"}))
    picker = Picker(None, path)
    picker.accelerator.value = "cpu"
    picker.devices.value = "2"
    picker.num_nodes.value = 2
    picker.save()
    assert f"saved to <code>{path}</code>" in picker.save_status.value
    assert load_defaults(path) == {
        "start_method": "spawn", "accelerator": "cpu", "devices": 2, "strategy": "auto", "precision": "32-true", "num_nodes": 2
    }
    picker.strategy.value = "ddp_fork"  # the saved start method is spawn
    assert "conflicts with start_method='spawn'" in picker.error and picker.save_button.disabled
    picker.strategy.value = "ddp"
    picker.config_path = tmp_path / "new" / "defaults.json"
    picker.save()
    assert load_defaults(picker.config_path)["strategy"] == "ddp"


def test_a_choice_this_machine_cannot_run_is_not_saved(tmp_path):
    if detect_hardware().cuda_count:
        pytest.skip("this machine has a CUDA GPU")
    picker = Picker(None, tmp_path / "defaults.json", hardware=GPUS)
    picker.save()
    assert "not saved: accelerator=&#x27;cuda&#x27; needs a CUDA GPU" in picker.save_status.value
    assert not (tmp_path / "defaults.json").exists()


# ----------------------------------------------------------------- in a kernel
class Kernel(KernelProcess):
    """One kernel whose settings file is `config`; `run` returns every message the cell caused."""

    def __init__(self, config):
        super().__init__(config)
        self.run("%load_ext nbfabric\nimport nbfabric\n_magics = get_ipython().magics_manager.registry['FabricMagics']")

    def run(self, code: str, timeout: float = 120, on_message=None, stop_on_error: bool = True) -> Cell:
        messages = []

        def collect(message):
            messages.append(message)
            if on_message is not None:
                on_message(message)

        reply = self.client.execute_interactive(textwrap.dedent(code), output_hook=collect, timeout=timeout, stop_on_error=stop_on_error)
        return Cell(messages, reply["content"])

    def dashboard_after(self, seconds: float) -> None:
        """Set how long a cell's run lasts before its dashboard replaces the text view (the package's
        DASHBOARD_AFTER, 0.5 s): a test of either view sets it, rather than racing it."""
        self.run(f"import nbfabric.notebook.run_view\nnbfabric.notebook.run_view.DASHBOARD_AFTER = {seconds!r}")

    def value(self, expression: str) -> str:
        cell = self.run(expression)
        assert cell.error is None, cell.error
        return cell.result

    def click(self, comm_id: str) -> None:
        """What a browser sends when a button is clicked."""
        content = {"comm_id": comm_id, "data": {"method": "custom", "content": {"event": "click"}}}
        self.client.shell_channel.send(self.client.session.msg("comm_msg", content))



class Cell:
    def __init__(self, messages: list[dict], reply: dict):
        self.messages = messages
        self.execution_count = reply.get("execution_count")

    def of_type(self, kind: str) -> list[dict]:
        return [m["content"] for m in self.messages if m["msg_type"] == kind]

    def stream(self, name: str) -> str:
        return "".join(c["text"] for c in self.of_type("stream") if c["name"] == name)

    @property
    def result(self) -> str | None:
        results = self.of_type("execute_result")
        return results[0]["data"]["text/plain"] if results else None

    @property
    def error(self) -> dict | None:
        errors = self.of_type("error")
        return errors[0] if errors else None

    def shown(self) -> list[dict]:
        """The data of each display, after the updates to it."""
        return [c["data"] for c in self.of_type("display_data")]

    def updates(self) -> list[dict]:
        return [c["data"] for c in self.of_type("update_display_data")]

    def stop_button(self) -> str:
        for content in self.of_type("comm_open"):
            state = content["data"].get("state", {})
            if state.get("_model_name") == "ButtonModel" and state.get("description") == "Stop":
                return content["comm_id"]
        raise AssertionError("no Stop button was shown")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return tmp_path_factory.mktemp("settings") / "defaults.json"


@pytest.fixture(scope="module")
def kernel(config_file):
    kernel = Kernel(config_file)
    kernel.default_dashboard_after = float(kernel.value("nbfabric.notebook.run_view.DASHBOARD_AFTER"))
    yield kernel
    kernel.close()


@pytest.fixture(autouse=True)
def fresh_defaults(request, config_file):
    """Each kernel test starts with no saved or %fabric defaults and the package's dashboard
    threshold, and leaves no rank behind."""
    if "kernel" not in request.fixturenames:
        yield
        return
    kernel = request.getfixturevalue("kernel")
    config_file.unlink(missing_ok=True)
    kernel.run("_magics.defaults.clear()")
    kernel.dashboard_after(kernel.default_dashboard_after)
    yield
    kernel.assert_no_ranks_left()


CPU2 = "%%fabric --accelerator=cpu --devices=2"


def test_the_picker_in_a_kernel_sets_the_next_cells_defaults_and_saves_them(kernel, config_file):
    shown = kernel.run("p = nbfabric.picker()\np")
    assert "application/vnd.jupyter.widget-view+json" in shown.of_type("execute_result")[0]["data"]
    assert shown.result.startswith("nbfabric picker (") and "CPU cores" in shown.result
    assert kernel.value("[value for _, value in p.accelerator.options]") == repr(list(detect_hardware().accelerators()))
    kernel.run("p.accelerator.value = 'cpu'; p.devices.value = '2'")
    assert kernel.value("p.error is None") == "True"
    assert kernel.value("%%fabric --no-widgets\nfabric.world_size") == "2"
    kernel.run("p.strategy.value = 'single_device'")
    assert "runs one process" in kernel.value("p.error") and "✗" in kernel.value("p.message.value")
    assert kernel.value("%%fabric --no-widgets\nfabric.world_size") == "2"
    kernel.run("p.strategy.value = 'auto'; p.save()")
    assert load_defaults(config_file) == {"accelerator": "cpu", "devices": 2, "strategy": "auto", "precision": "32-true", "num_nodes": 1}
    kernel.run("_magics.defaults.clear()")
    assert kernel.value("%%fabric --no-widgets\nfabric.world_size") == "2"
    assert "--accelerator=cpu --devices=2 --strategy=ddp" in kernel.run("%fabric").stream("stdout")
    assert "widget-view" in json.dumps(kernel.run("%fabric --picker").shown())


def test_saved_defaults_are_the_lowest_layer(kernel, config_file):
    config_file.write_text(json.dumps({"accelerator": "cpu", "devices": 2, "precision": "bf16-mixed"}))
    assert kernel.value("%%fabric --no-widgets\n(fabric.world_size, fabric.config.precision)") == "(2, 'bf16-mixed')"
    kernel.run("%fabric --devices=1")
    assert kernel.value("%%fabric --no-widgets\n(fabric.world_size, fabric.config.precision)") == "(1, 'bf16-mixed')"
    assert kernel.value("%%fabric --no-widgets --precision=32\n(fabric.world_size, fabric.config.precision)") == "(1, '32-true')"
    config_file.write_text("{broken")
    assert "cannot read the nbfabric settings file" in kernel.run("%%fabric\n1").stream("stderr")


def test_a_run_shows_a_dashboard_then_leaves_a_text_summary_and_a_png(kernel):
    cell = kernel.run(
        f"""
        {CPU2}
        import time
        for step in range(10):
            fabric.log("loss", 1.0 / (step + 1), step=step)
            print(f"step {{step}} on {{fabric.global_rank}}")
        time.sleep(1.0)  # the dashboard appears after 0.5 s, with what came before
        fabric.world_size
        """
    )
    assert cell.error is None, cell.error
    assert cell.result == "2"
    for rank in (0, 1):  # every line stays in the cell, as in a plain cell
        assert "".join(f"[rank {rank}] step {step} on {rank}\n" for step in range(10)) in "".join(
            line + "\n" for line in cell.stream("stdout").splitlines() if line.startswith(f"[rank {rank}]")
        )
    live, summary, chart_png = cell.shown()
    assert "application/vnd.jupyter.widget-view+json" in live
    # the dashboard's text form and its replacement are both empty, so nbval (which applies no
    # update) and a saved notebook see the same outputs
    assert live["text/plain"] == "" and cell.updates() == [{"text/plain": ""}]
    assert set(summary) == {"text/plain"}
    text = summary["text/plain"]
    assert ": done after " in text
    for rank in (0, 1):  # and the most memory the rank used, where it was measured before it ended
        assert re.search(rf"rank {rank}: done \(10 lines(, peak [1-9][\d.]* (MB|GB))?\)", text), text
    assert "loss=0.1 (step 9)" in text and "last lines" not in text  # the lines are just above
    assert set(chart_png) == {"image/png", "text/plain"}
    assert len(chart_png["image/png"]) < 100_000
    assert len(cell.of_type("comm_open")) == len(cell.of_type("comm_close"))  # no widget state is left


def test_a_run_that_ends_before_the_dashboard_threshold_ends_as_text_with_no_widget(kernel):
    kernel.dashboard_after(3600)  # every run here ends first, as a run under 0.5 s does on a fast machine
    cell = kernel.run(
        f"""
        {CPU2}
        for step in range(3):
            fabric.log("loss", 1.0 / (step + 1), step=step)
        print("done on", fabric.global_rank)
        """
    )
    assert cell.error is None, cell.error
    stdout = cell.stream("stdout")
    assert "[rank 0] done on 0\n" in stdout and "[rank 1] done on 1\n" in stdout
    summary = stdout[stdout.index("nbfabric --accelerator=cpu --devices=2"):]
    assert ": done after " in summary and "rank 0: done (1 line)" in summary and "rank 1: done (1 line)" in summary
    assert "loss=0.3333 (step 2)" in summary and "last lines" not in summary  # the lines are just above
    assert cell.of_type("comm_open") == []
    (chart_png,) = cell.shown()
    assert set(chart_png) == {"image/png", "text/plain"}
    assert kernel.run(f"{CPU2}\nprint('quiet')").shown() == []  # nothing logged: no chart
    failed = kernel.run(f"{CPU2}\nif fabric.global_rank == 1:\n    raise ValueError('broken on purpose')", stop_on_error=False)
    assert failed.error["ename"] == "RankError"
    assert "rank 1: failed: ValueError: broken on purpose" in failed.stream("stdout")


def test_no_widgets_shows_tagged_text_lines(kernel):
    cell = kernel.run(f"{CPU2} --no-widgets\nprint('hello from', fabric.global_rank)")
    assert "[rank 0] hello from 0\n" in cell.stream("stdout") and "[rank 1] hello from 1\n" in cell.stream("stdout")
    assert cell.shown() == [] and cell.of_type("comm_open") == []


def test_the_stop_button_ends_a_running_cell_and_requests_sent_meanwhile_run_after_it(kernel):
    seen, clicked = [], []

    def click_once_working(message):
        seen.append(message)
        value = message["content"].get("data", {}).get("state", {}).get("value")
        if not clicked and isinstance(value, str) and "working" in value:
            clicked.append(time.monotonic())
            kernel.client.execute("seen_duration = run.duration")  # queued while the cell runs
            kernel.click(Cell(seen, {}).stop_button())

    code = f"{CPU2} --out run\nimport time\nprint('working', flush=True)\ntime.sleep(120)"
    cell = kernel.run(code, timeout=60, on_message=click_once_working, stop_on_error=False)
    assert clicked, "the dashboard never showed the rank's line"
    assert time.monotonic() - clicked[0] < 15
    assert cell.error["ename"] == "KeyboardInterrupt"
    (shown,) = cell.error["traceback"]  # not the launcher's frames: what was stopped, and where each rank was
    assert shown.startswith("KeyboardInterrupt: every rank was stopped\n\nWhere the ranks were then:\nrank 0: ") and "\nrank 1: " in shown
    assert ": stopped after " in cell.shown()[1]["text/plain"]
    assert kernel.value("type(seen_duration).__name__") == "'float'"  # ran after the cell, not during it


def test_a_background_run_returns_at_once_and_wait_brings_back_its_names(kernel, tmp_path):
    go = tmp_path / "go"  # the ranks finish only once the test has created it
    launched = kernel.run(
        f"""
        {CPU2} --background
        import os, time
        for step in range(8):
            fabric.log("loss", 1.0 / (step + 1), step=step)
            print("step", step, flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.05)
        answer = 40 + fabric.world_size
        answer
        """,
        timeout=60,
    )  # it returned while the ranks wait: the cell did not wait for the run
    assert launched.error is None and launched.result is None
    assert "widget-view" in json.dumps(launched.shown())
    refused = kernel.run(f"{CPU2}\nprint('second')")
    assert f"the background run of cell [{launched.execution_count}]" in refused.stream("stderr")
    assert "is still running; %fabric wait waits for it, %fabric stop ends it" in refused.stream("stderr")
    deadline = time.monotonic() + 20
    while "step 1" not in kernel.value("_magics.background.view.log.value") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kernel.value("_magics.background.view.state") == "'running'"  # updated from the run's thread
    assert kernel.value("_magics.background.view.rank_status") == "{0: ('running', ''), 1: ('running', '')}"
    go.touch()
    waited = kernel.run("%fabric wait")
    assert waited.error is None, waited.error
    assert waited.result == "42"
    assert kernel.value("answer") == "42"
    summary, png = waited.shown()
    assert ": done after " in summary["text/plain"] and "image/png" in png
    assert waited.updates() == [{"text/plain": ""}]
    assert "no background run" in kernel.run("%fabric wait").stream("stderr")


def test_a_background_run_ends_by_its_stop_button_or_by_fabric_stop(kernel):
    long_run = f"{CPU2} --background\nimport time\nprint('working', flush=True)\ntime.sleep(120)"
    launched = kernel.run(long_run)
    deadline = time.monotonic() + 30
    while "working" not in kernel.value("_magics.background.view.log.value") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "working" in kernel.value("_magics.background.view.log.value")
    kernel.click(launched.stop_button())
    waited = kernel.run("%fabric wait", timeout=30)
    assert waited.error["ename"] == "KeyboardInterrupt"
    assert ": stopped after " in waited.shown()[0]["text/plain"]
    kernel.run(f"{long_run.splitlines()[0]} --no-widgets\nimport time\ntime.sleep(120)")
    deadline = time.monotonic() + 10
    while len(kernel.children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(kernel.children()) >= 2
    stopped = kernel.run("%fabric stop", timeout=30)
    assert "stopped the background run of cell [" in stopped.stream("stdout")
    assert kernel.children() == []
    assert "no background run" in kernel.run("%fabric stop").stream("stderr")


def test_two_ranks_printing_100k_lines_each_are_all_delivered_with_and_without_the_dashboard(kernel):
    # how long each view takes is measured in benchmarks/dashboard_cost.py, not asserted here
    kernel.dashboard_after(0)  # the dashboard from the first look, however fast the run
    code = f"{CPU2} --out run{{}}\nfor i in range(100_000):\n    print('line', i)"
    for flags, view in (("", "dashboard"), (" --no-widgets", None)):
        cell = kernel.run(code.format(flags))
        assert cell.error is None, cell.error
        assert kernel.value("len(run.lines)") == "200000"
        assert kernel.value("sorted((r, text) for r, _, text in run.lines) == sorted((r, f'line {i}') for r in (0, 1) for i in range(100_000))") == "True"
        assert bool(cell.of_type("comm_open")) == (view == "dashboard")


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("%%fabric --picker\n1", "--picker belongs on a %fabric line"),
        ("%fabric --background", "--background belongs on a %%fabric cell"),
        ("%fabric wait --devices=2", "%fabric wait takes no flags"),
        ("%fabric --config=x.json", "use it with --picker"),
    ],
)
def test_misplaced_flags_are_refused(kernel, code, message):
    assert message in kernel.run(code).stream("stderr")


RICH_CELL = """
import matplotlib.pyplot as plt
from IPython.display import HTML, display
print("before", fabric.global_rank)
display(HTML(f"<b>table of rank {fabric.global_rank}</b>"))
plt.plot([1, 2, 3])
plt.show()
print("after", fabric.global_rank)
"""


def test_rich_output_of_the_ranks_renders_as_in_a_plain_cell(kernel):
    cell = kernel.run(f"{CPU2} --no-widgets\n{RICH_CELL}")
    assert cell.error is None, cell.error
    shown = cell.shown()
    assert sorted(data.get("text/html") for data in shown if "text/html" in data) == ["<b>table of rank 0</b>", "<b>table of rank 1</b>"]
    assert sum("image/png" in data for data in shown) == 2  # each rank's figure, not "<Figure size ...>"
    assert "Figure size" not in cell.stream("stdout") and "[rank 1] \n" in cell.stream("stdout")  # rank 1's tag


def test_a_dashboard_run_leaves_every_line_and_display_in_order(kernel):
    cell = kernel.run(f"{CPU2} --ranks 0\nimport time\ntime.sleep(0.8)\n{RICH_CELL}")
    assert cell.error is None, cell.error
    kinds = [("html" if "text/html" in c["data"] else "png" if "image/png" in c["data"] else "other") if m == "display_data" else c["text"]
             for m, c in ((m["msg_type"], m["content"]) for m in cell.messages) if m in ("display_data", "stream")]
    text = [k for k in kinds if k not in ("html", "png", "other")]
    assert "[rank 0] before 0\n" in "".join(text) and "[rank 0] after 0\n" in "".join(text)
    assert kinds.index("html") < kinds.index("png")
    assert "rank 1" not in "".join(text)


def test_tqdm_bars_of_the_ranks_move_one_line_per_rank(kernel):
    cell = kernel.run(f"{CPU2} --no-widgets\nimport time\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(40)):\n    time.sleep(0.02)")
    assert cell.error is None, cell.error
    assert not [c for c in cell.of_type("comm_open")]  # no widget from a rank
    final = {}
    for message in cell.messages:
        if message["msg_type"] in ("display_data", "update_display_data"):
            text = message["content"]["data"].get("text/plain", "")
            final[text.split("]")[0]] = text
    assert set(final) == {"[rank 0", "[rank 1"}
    assert all("40/40" in text for text in final.values())
    assert "\x1b[K" not in cell.stream("stderr")
