"""Rank pools on ipyparallel's MPI and SSH engines, driven from a real kernel: Open MPI's mpiexec on
this machine, and an sshd of the test's own on two loopback addresses as two hosts. Skipped, saying
why, where these cannot start, except in CI (CI=true), where a missing service fails them."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import missing_service
from test_magic import Kernel

from nbfabric.launcher.machine import free_port
from nbfabric.pool import RankPool

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)

POOL = "%%fabric --no-widgets"
SSHD = Path("/usr/sbin/sshd")
SSH_HOSTS = ("127.0.0.1", "127.0.0.2")

REDUCE = f"{POOL}\nfabric.all_reduce(torch.tensor(fabric.global_rank + 1.0), reduce_op='sum').item()"
SETUP = f"""{POOL}
import os
torch.manual_seed(0)
net = torch.nn.Linear(4, 1)
model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.05))
engine, losses = os.getpid(), []"""
STEP = f"""{POOL}
g = torch.Generator().manual_seed(fabric.global_rank)  # each rank its own batch
x = torch.randn(32, 4, generator=g)
for _ in range(5):
    loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
    optimizer.zero_grad()
    fabric.backward(loss)
    optimizer.step()
losses.append(loss.item())
print("same engine:", engine == os.getpid())
weights = fabric.all_gather(torch.cat([p.detach().flatten() for p in model.parameters()])).tolist()
(losses, weights) if fabric.global_rank == 0 else None"""


def reduce_and_train_across_cells(kernel: Kernel) -> None:
    """An all-reduce over both ranks, then a DDP model set up in one cell that trains on in the next
    two, in the same engines, the ranks' weights kept equal."""
    out = kernel.run(REDUCE, timeout=180)
    assert out["error"] is None and out["result"] == "3.0", out
    assert kernel.run(SETUP, timeout=180)["error"] is None
    steps = [kernel.run(STEP, timeout=180) for _ in range(2)]
    assert [out["error"] for out in steps] == [None, None], steps
    for rank in (0, 1):
        assert f"[rank {rank}] same engine: True" in steps[1]["stdout"], steps[1]
    losses, (rank0_weights, rank1_weights) = eval(steps[1]["result"])
    assert len(losses) == 2 and losses[1] < losses[0]
    assert rank0_weights == rank1_weights


def pool_ranks(shown: str) -> dict[int, tuple[str, int]]:
    """rank -> (address, engine pid), from what `%fabric pool` shows."""
    found = re.findall(r"rank (\d+): node \S+ \(([^)]+)\), local rank \d+, \S+, engine \d+, pid (\d+)", shown)
    return {int(rank): (address, int(pid)) for rank, address, pid in found}


def end_left_engines(pids: list[int], grace: float = 15) -> list[int]:
    """Engines (not the kernel's children) still running after `grace` seconds, then killed by pid."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.2)
    left = [pid for pid in pids if _running(pid)]
    for pid in left:
        psutil.Process(pid).kill()
    return left


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hosts": "a,b", "num_nodes": 2}, "--hosts names the machines of MPI or SSH engines; use it with --engines=mpi or --engines=ssh"),
        ({"engines": "ssh"}, "--engines=ssh needs --hosts=HOST[,HOST...]"),
        ({"engines": "ssh", "hosts": "a,b"}, "--hosts names 2 host(s) but --num-nodes=1; give one host per node"),
        ({"engines": "ssh", "hosts": "a,,b", "num_nodes": 3}, "--hosts=a,,b is not valid; name each host once"),
        ({"engines": "mpi", "hosts": ["a", "a"], "num_nodes": 2}, "--hosts=a,a is not valid; name each host once"),
    ],
)
def test_hosts_that_do_not_fit_are_refused_before_anything_starts(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RankPool(**options)


# ----------------------------------------------------------------- MPI
@pytest.fixture
def mpiexec():
    if shutil.which("mpiexec") is None:
        missing_service("no mpiexec here (Debian's openmpi-bin)")
    if importlib.util.find_spec("mpi4py") is None:
        missing_service("mpi4py is not installed (pip install -e '.[mpi]')")


def test_an_mpi_pool_of_two_ranks_reduces_and_trains_a_model_across_cells(mpiexec, tmp_path):
    kernel = Kernel(tmp_path / "none.json")
    try:
        out = kernel.run("%fabric start --engines=mpi --hosts=127.0.0.1 --devices=2", timeout=240)
        assert out["error"] is None, out
        assert "(mpi engines" in out["stdout"] and len(pool_ranks(out["stdout"])) == 2, out["stdout"]
        # --no-return: the module would come back, and importing it in the kernel starts an MPI singleton there
        out = kernel.run(f"{POOL} --no-return\nfrom mpi4py import MPI\nprint('mpi rank', MPI.COMM_WORLD.Get_rank(), 'of', MPI.COMM_WORLD.Get_size())")
        assert "[rank 0] mpi rank 0 of 2" in out["stdout"] and "[rank 1] mpi rank 1 of 2" in out["stdout"], out
        reduce_and_train_across_cells(kernel)
        assert "stopped: no engine is left" in kernel.run("%fabric stop-pool", timeout=120)["stdout"]
        kernel.assert_no_ranks_left(grace=15)
    finally:
        kernel.close()


# ----------------------------------------------------------------- SSH
@pytest.fixture(scope="module")
def ssh_profile(tmp_path_factory):
    """An sshd of this module's own, listening on 127.0.0.1 and 127.0.0.2 (two hosts) and admitting
    a key made here, and an ipyparallel profile that tells the SSH launcher how to reach them (its
    port, the key, the Python to run there): the profile's name. Both are gone afterwards."""
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh-keygen") is None:
        missing_service(f"no OpenSSH server here ({SSHD}, Debian's openssh-server)")
    folder = tmp_path_factory.mktemp("ssh")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
    (folder / "authorized_keys").write_text((folder / "user_key.pub").read_text())
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\n"
        + "".join(f"ListenAddress {host}\n" for host in SSH_HOSTS)
        + f"HostKey {folder / 'host_key'}\nAuthorizedKeysFile {folder / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        "StrictModes no\nUsePAM no\nPidFile none\nSubsystem sftp internal-sftp\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    options = ["-i", str(folder / "user_key"), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
    from IPython.paths import get_ipython_dir

    name = f"nbfabric-ssh-test-{os.getpid()}"
    profile = Path(get_ipython_dir()) / f"profile_{name}"
    with open(folder / "sshd.log", "wb") as log:
        sshd = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(folder / "sshd_config")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while any(_ssh(options, port, host) for host in SSH_HOSTS):
            if sshd.poll() is not None or time.monotonic() > deadline:
                missing_service(f"the test's sshd did not let us in: {(folder / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.2)
        profile.mkdir(parents=True)
        (profile / "ipcluster_config.py").write_text(
            f"c.SSHLauncher.ssh_args = {['-p', str(port), *options]!r}\n"
            f"c.SSHLauncher.scp_args = {['-P', str(port), *options]!r}\n"
            f"c.SSHLauncher.remote_python = {sys.executable!r}\n"
        )
        yield name
    finally:
        sshd.terminate()
        sshd.wait(30)
        shutil.rmtree(profile, ignore_errors=True)


def _ssh(options: list[str], port: int, host: str) -> int:
    """The exit status of `true` run on `host` over the test's sshd."""
    return subprocess.run(["ssh", "-p", str(port), *options, host, "true"], capture_output=True, timeout=30).returncode


def test_an_ssh_pool_on_two_hosts_reduces_and_trains_a_model_across_cells(ssh_profile, tmp_path):
    kernel, engines = Kernel(tmp_path / "none.json"), []
    try:
        out = kernel.run(
            f"%fabric start --engines=ssh --hosts={','.join(SSH_HOSTS)} --num-nodes=2 --devices=1 --profile={ssh_profile}",
            timeout=240,
        )
        assert out["error"] is None, out
        ranks = pool_ranks(out["stdout"])
        engines = [pid for _, pid in ranks.values()]
        assert "(ssh engines" in out["stdout"] and sorted(address for address, _ in ranks.values()) == list(SSH_HOSTS), out["stdout"]
        assert not set(engines) & set(kernel.children())  # started by sshd, not by the kernel
        out = kernel.run(f"{POOL}\nimport os\nprint('reached at', os.environ['SSH_CONNECTION'].split()[2])")
        for rank, (address, _) in ranks.items():
            assert f"[rank {rank}] reached at {address}" in out["stdout"], out
        reduce_and_train_across_cells(kernel)
        assert "stopped: no engine is left" in kernel.run("%fabric stop-pool", timeout=120)["stdout"]
        assert end_left_engines(engines) == []
        kernel.assert_no_ranks_left(grace=15)
    finally:
        try:
            kernel.run("%fabric stop-pool", timeout=120)  # nothing to stop unless the test failed
        finally:
            kernel.close()
            end_left_engines(engines)
