"""A refused fork names what initialised CUDA: the cell and line, or the import chain, recorded by the
hook nbfabric installs when it is loaded. CUDA is never touched: its initialisation is faked."""

from __future__ import annotations

import os
import sys
import textwrap
import types

import IPython
import pytest
import torch
from jupyter_client.manager import start_new_kernel
from test_magic import Kernel

from nbfabric import ForkUnsafeError
from nbfabric.launcher import cuda_culprit
from nbfabric.kernel_spec import KERNEL_ENV, LOAD_EXTENSION
from nbfabric.launcher.fork_safety import check_fork_safe

CELL_FILE = "/tmp/ipykernel_0/0123456789.py"  # a cell's file as the kernel names it; it is cell 7 here
ADVICE = ("%fabric start --engines=local", "start_method='spawn'", "restart the kernel")


def hook(monkeypatch, lazy_init, initialised: bool = False) -> None:
    """A fresh hook around `lazy_init` in place of torch's, with CUDA initialised or not."""
    monkeypatch.setattr(torch.cuda, "_lazy_init", lazy_init)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised or lazy_init.initialised)
    monkeypatch.setattr(cuda_culprit, "_first", None)
    monkeypatch.setattr(cuda_culprit, "_initialised_before", False)
    lazy_init.initialised = False
    cuda_culprit.install()


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch's CUDA initialisation replaced by one that only marks CUDA initialised, behind a fresh
    hook; CELL_FILE is cell 7 of the notebook. Returns the fake, which counts its calls."""

    def pretend_to_initialise_cuda():
        pretend_to_initialise_cuda.calls += 1
        pretend_to_initialise_cuda.initialised = True

    pretend_to_initialise_cuda.calls = 0
    hook(monkeypatch, pretend_to_initialise_cuda)
    shell = types.SimpleNamespace(compile=types.SimpleNamespace(_filename_map={CELL_FILE: 7}))
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    return pretend_to_initialise_cuda


@pytest.fixture
def library(tmp_path, monkeypatch):
    """A package `gpulib` in tmp_path whose gpu.py initialises CUDA in setup(), which its body calls
    (line 8); imported afresh by each test."""
    package = tmp_path / "gpulib"
    package.mkdir()
    (package / "__init__.py").write_text("from gpulib import gpu\n")
    (package / "gpu.py").write_text("import torch\n\n\ndef setup():\n    torch.cuda.init()\n\n\nsetup()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package
    for name in ("gpulib", "gpulib.gpu"):
        sys.modules.pop(name, None)


def run_cell(code: str, filename: str = CELL_FILE) -> None:
    exec(compile(textwrap.dedent(code), filename, "exec"), {"__name__": "__main__", "torch": torch})


def refusal() -> str:
    with pytest.raises(ForkUnsafeError) as refused:
        check_fork_safe()
    return str(refused.value)


def test_a_refused_fork_names_the_cell_line_that_initialised_cuda_and_keeps_its_advice(fake_cuda):
    run_cell("x = 1\ntorch.cuda.init()\n")
    message = refusal()
    assert message.startswith(
        "CUDA is already initialised in this process, so ranks cannot be forked from it. "
        "It was initialised at Cell In[7], line 2. Without a restart: "
    ), message
    assert all(advice in message for advice in ADVICE), message


def test_an_import_that_initialises_cuda_is_named_by_its_import_chain(fake_cuda, library):
    run_cell("x = 1\nimport gpulib\n")
    assert (
        "It was initialised by import gpulib (Cell In[7], line 2) → gpulib/__init__.py, line 1 → "
        "gpulib/gpu.py, line 8 → gpulib/gpu.py, line 5, in setup."
    ) in refusal()


def test_a_library_call_from_a_cell_is_named_by_the_cell_line_and_the_function(fake_cuda, library):
    (library / "gpu.py").write_text("import torch\n\n\ndef setup():\n    torch.cuda.init()\n")
    run_cell("import gpulib\ngpulib.gpu.setup()\n")
    assert "It was initialised at Cell In[7], line 2 → gpulib/gpu.py, line 5, in setup." in refusal()


def test_in_a_script_the_line_of_the_script_is_named(fake_cuda, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    run_cell("import torch\ntorch.cuda.init()\n", filename=str(tmp_path / "train.py"))
    assert "It was initialised at train.py, line 2." in refusal()


@pytest.mark.skipif(torch.version.cuda is not None, reason="a tensor made on CUDA would initialise it for real")
def test_a_tensor_made_on_cuda_is_seen_through_the_lazy_init_torch_calls_from_cpp(fake_cuda):
    # torch's C++ side calls _lazy_init once per process and then takes CUDA as initialised: in a
    # forked child, so that the tests after this one still see a process without CUDA
    pid = os.fork()
    if pid == 0:
        code = 4
        try:
            try:
                run_cell("torch.zeros(1, device='cuda')\n")
                code = 2  # this torch has no CUDA kernels: making the tensor must fail
            except (RuntimeError, NotImplementedError):
                code = 0 if fake_cuda.calls == 1 and "It was initialised at Cell In[7], line 1." in refusal() else 3
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_the_first_initialisation_is_kept_and_every_call_still_reaches_torch(fake_cuda):
    run_cell("torch.cuda.init()\nx = 1\ntorch.cuda.init()\n")
    assert fake_cuda.calls == 2
    assert "at Cell In[7], line 1." in refusal()


def test_a_failed_initialisation_raises_the_same_error_and_records_nothing(monkeypatch):
    error = AssertionError("Torch not compiled with CUDA enabled")

    def fail():
        raise error

    hook(monkeypatch, fail)
    with pytest.raises(AssertionError) as raised:
        torch.cuda.init()
    assert raised.value is error
    assert cuda_culprit.culprit() == ""
    check_fork_safe()


def test_cuda_initialised_before_nbfabric_was_loaded_is_said_so(monkeypatch):
    hook(monkeypatch, lambda: None, initialised=True)
    assert "It was initialised before nbfabric was loaded: load nbfabric first (%load_ext nbfabric" in refusal()


def test_importing_nbfabric_wraps_torchs_lazy_init_wherever_torch_holds_it():
    hooked = torch.cuda._lazy_init
    assert hooked.__wrapped__.__code__.co_filename == torch.cuda.__file__
    assert torch.cuda.memory._lazy_init is hooked and torch.cuda.random._lazy_init is hooked
    cuda_culprit.install()
    assert torch.cuda._lazy_init is hooked


class StartedKernel(Kernel):
    """A kernel started as the nbfabric kernel is: nbfabric loaded before the first cell."""

    def __init__(self, settings_file):
        env = {**os.environ, **KERNEL_ENV, "NBFABRIC_CONFIG": str(settings_file)}
        self.manager, self.client = start_new_kernel(
            kernel_name="python3", extra_arguments=["--HistoryManager.enabled=False", LOAD_EXTENSION], env=env
        )
        self.pid = self.manager.provisioner.pid


# In place of the body of torch's own _lazy_init, which the hook installed at start wraps: mark CUDA
# initialised in torch.cuda (whose globals the function keeps) and touch nothing.
PRETEND = """
import torch

def pretend_to_initialise_cuda():
    global _initialized
    _initialized = True

torch.cuda._lazy_init.__wrapped__.__code__ = pretend_to_initialise_cuda.__code__
"""


@pytest.mark.parametrize(
    ("trigger", "expected"),
    [
        ("torch.cuda.init()", "It was initialised at Cell In[{cell}], line 2. Without a restart"),
        (
            "import gpulib",
            "It was initialised by import gpulib (Cell In[{cell}], line 2) → gpulib/__init__.py, line 1 → "
            "gpulib/gpu.py, line 8 → gpulib/gpu.py, line 5, in setup. Without a restart",
        ),
    ],
    ids=["cell", "import"],
)
def test_in_the_nbfabric_kernel_a_refused_cell_names_what_initialised_cuda(tmp_path, library, trigger, expected):
    kernel = StartedKernel(tmp_path / "none.json")
    try:
        assert kernel.run(f"{PRETEND}\nimport sys\nsys.path.insert(0, {str(tmp_path)!r})")["error"] is None
        reply = kernel.client.execute_interactive(f"x = 1\n{trigger}", timeout=60)["content"]
        assert reply["status"] == "ok", reply
        refused = kernel.run("%%fabric --accelerator=cpu --devices=2 --no-widgets\nprint('forked')")
        assert "forked" not in refused["stdout"]
        assert refused["error"]["ename"] == "ForkUnsafeError", refused
        assert expected.format(cell=reply["execution_count"]) in refused["error"]["evalue"], refused["error"]["evalue"]
    finally:
        kernel.close()
