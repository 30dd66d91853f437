"""The picker and the run dashboard in JupyterLab, as a person sees them: headless Chromium on loopback.

Screenshots go to tests/artifacts/. Debian's chromium is needed (`apt-get install chromium`);
without it the test skips, saying so, except in CI (CI=true), where it fails.

What it starts (JupyterLab, its kernel and ranks, chromium) is this module's own process tree, ended
by pid by its fixtures, and the test checks that the kernel has no rank left. The shared `no_leaks`
check is not applied: playwright's event loop starts worker threads in this process as it goes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import psutil
import pytest
from conftest import missing_service
from playwright.sync_api import expect, sync_playwright

from nbfabric.devices import describe_hardware
from nbfabric.notebook.picker import Picker

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"]
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module", autouse=True)
def chromium():
    """Debian's chromium: without it the module skips, or fails in CI."""
    if not os.path.exists(CHROMIUM):
        missing_service(f"no browser: Debian's chromium is not installed at {CHROMIUM}")


CELLS = [
    "%load_ext nbfabric\nimport nbfabric\nnbfabric.picker()",
    (
        "%%fabric --accelerator=cpu --devices=2\nimport math, time\nfor step in range(12):\n"
        "    fabric.log_dict({'loss': math.exp(-step / 4) + 0.1 * fabric.global_rank, 'accuracy': 1 - math.exp(-step / 3)}, step=step)\n"
        "    print(f'step {step}: loss {math.exp(-step / 4):.3f}', flush=True)\n    time.sleep(0.1)"
    ),
    (
        "%%fabric --accelerator=cpu --devices=2\nimport time\nfor step in range(6):\n"
        "    fabric.log('loss', 1 / (step + 1) + fabric.global_rank, step=step)\n"
        "    print(f'long run, step {step}', flush=True)\ntime.sleep(600)"
    ),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop_process_tree(pid: int) -> None:
    """SIGTERM the process (a server shuts its kernels down), then SIGKILL it and whatever it started."""
    try:
        process = psutil.Process(pid)
        tree = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=10)
    for leftover in alive:
        try:
            leftover.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 (empty token) serving a notebook with the picker, a short run and a long one."""
    home = tmp_path_factory.mktemp("lab")
    root = home / "notebooks"
    root.mkdir()
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in CELLS])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, root / "widgets.ipynb")
    config = home / "config"
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "IPYTHONDIR": str(home / "ipython"),
        "NBFABRIC_CONFIG": str(home / "nbfabric.json"),
    }
    port = _free_port()
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0", "--allow-root", "--LabApp.extension_manager=readonly", "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", f"--LabApp.workspaces_dir={home / 'workspaces'}",
        f"--LabApp.user_settings_dir={home / 'settings'}",
    ]
    log = open(home / "jupyterlab.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{(home / 'jupyterlab.log').read_text()[-3000:]}") from None
                time.sleep(0.3)
        yield SimpleLab(url, server.pid, Path(env["NBFABRIC_CONFIG"]))
    finally:
        _stop_process_tree(server.pid)
        server.wait(timeout=10)
        log.close()


class SimpleLab:
    def __init__(self, url: str, pid: int, settings: Path):
        self.url = url
        self.pid = pid
        self.settings = settings

    def kernels(self) -> list[psutil.Process]:
        return [p for p in psutil.Process(self.pid).children() if "ipykernel" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def page(lab):
    """Headless Chromium (Debian's) on the notebook; every browser process is ended by pid afterwards."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        started = [p for p in me.children(recursive=True) if p.pid not in before]
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(f"{lab.url}/lab/tree/widgets.ipynb")
            page.wait_for_function(
                "() => window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status === 'idle'",
                timeout=120_000,
            )
            yield page
        finally:
            browser.close()
    for process in started:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(started, timeout=5)


def _cell(page, index: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(index)


def _run_all(page) -> None:
    """Send every cell (without waiting for them: the last one runs until stopped)."""
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def _shoot(locator, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    locator.scroll_into_view_if_needed()
    locator.screenshot(path=str(path))
    return path


def test_picker_dashboard_and_stop_in_jupyterlab(lab, page):
    _run_all(page)  # every cell is sent now: the runs' cells wait in the kernel's queue

    picker = _cell(page, 0).locator(".jp-OutputArea-output")
    expect(picker).to_contain_text(describe_hardware(), timeout=60_000)
    machine = [label for label, _ in Picker(None, os.devnull).accelerator.options]
    accelerator = picker.get_by_role("combobox", name="accelerator")
    assert [text.replace("\xa0", " ") for text in accelerator.locator("option").all_inner_texts()] == machine
    precision_options = picker.get_by_role("combobox", name="precision").locator("option").all_inner_texts()
    assert "32-true" in precision_options and "16-mixed" not in precision_options
    expect(picker).to_contain_text("not offered: precision='16-mixed' is not available on CPU")
    devices = picker.get_by_role("textbox", name="devices")
    devices.fill("2")
    devices.press("Enter")  # handled by the kernel while it runs the next cells
    expect(picker).to_contain_text("%%fabric --accelerator=cpu --devices=2 --strategy=ddp --precision=32-true")
    expect(picker).to_contain_text("nbfabric run train.py --accelerator=cpu --devices=2")
    picker.get_by_role("button", name="Save as default").click()
    expect(picker).to_contain_text(f"saved to {lab.settings}")
    assert json.loads(lab.settings.read_text())["devices"] == 2
    _shoot(_cell(page, 0), "browser-picker.png")

    short = _cell(page, 1).locator(".jp-Cell-outputArea")
    expect(short).to_contain_text(": done after ", timeout=90_000)
    expect(short).to_contain_text("rank 1: done (12 lines, peak ")  # and the most memory it used
    expect(short).to_contain_text("[rank 1] step 11: loss 0.064")
    expect(short.locator("img")).to_have_count(1)  # the chart, as a PNG output
    _shoot(_cell(page, 1), "browser-summary.png")

    long = _cell(page, 2).locator(".jp-Cell-outputArea")
    log = long.locator(".widget-html-content pre")
    expect(log).to_contain_text("[rank 0] long run, step 5", timeout=60_000)
    expect(log).to_contain_text("[rank 1] long run, step 5")
    expect(long.locator(".widget-image")).to_be_visible()
    expect(long).to_contain_text("running")
    expect(long).to_contain_text("% CPU")  # each rank's memory and CPU, in the status table
    long.get_by_role("button", name="Where").click()
    for rank in (0, 1):  # where each rank is, while the run goes on
        expect(long).to_contain_text(f"rank {rank}: time.sleep at Cell In[3], line 6", timeout=30_000)
    expect(long).to_contain_text("Where the ranks were at ")
    _shoot(_cell(page, 2), "browser-dashboard.png")

    clicked = time.monotonic()
    long.get_by_role("button", name="Stop").click()
    expect(long).to_contain_text("KeyboardInterrupt", timeout=30_000)
    expect(long).to_contain_text(": stopped after ")
    expect(long).to_contain_text("KeyboardInterrupt: every rank was stopped\n\nWhere the ranks were then:\nrank 0: time.sleep at Cell In[3], line 6")
    assert time.monotonic() - clicked < 30
    (kernel,) = lab.kernels()
    deadline = time.monotonic() + 10
    while kernel.children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kernel.children() == []
    _shoot(_cell(page, 2), "browser-stopped.png")
