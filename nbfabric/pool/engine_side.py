"""The engines' side of a rank pool: functions that run in an ipyparallel engine, which stays up between runs.

Output and events of a run travel on the engine's IOPub socket (`engine_output`)."""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
import signal
import socket
import stat
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from nbfabric.channel import Failure, Left, now
from nbfabric.launcher.worker import exit_code, where_raised
from nbfabric.pool.engine_output import EngineChannel, output_to



def describe() -> dict[str, Any]:
    """Where this engine runs: its node (Slurm's name for it, else the host name), address, pid, and
    its task number under Slurm or MPI (which orders the ranks as the launcher did). An engine that
    no launcher numbered and that SSH started is at the address SSH reached (what tells apart hosts
    that share a name); the others are at their host name's address."""
    host = socket.gethostname()
    task = os.environ.get("SLURM_PROCID", os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK")))
    reached = os.environ.get("SSH_CONNECTION", "").split()[2:3] if task is None else []
    return {
        "task": None if task is None else int(task),
        "node": os.environ.get("SLURMD_NODENAME", host),
        "host": host,
        "address": reached[0] if reached else _address(host),
        "pid": os.getpid(),
    }


def free_port() -> int:
    """A port nothing listens on, on this engine's machine."""
    from nbfabric.launcher.machine import free_port as find

    return find("")


def join(env: dict[str, str], local_world_size: int) -> None:
    """Take this rank's place: torchrun's variables, the intra-op threads, text progress bars, no input()."""
    from nbfabric.launcher.inherited import refuse_input, text_progress_bars
    from nbfabric.launcher.machine import threads_per_rank

    threads = threads_per_rank(local_world_size)
    os.environ.update(env)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt counts only while a run goes on
    _requests()
    refuse_input()
    if importlib.util.find_spec("tqdm") is not None:
        import tqdm.notebook  # noqa: F401 - an engine is a kernel: tqdm.auto would pick widget bars

        text_progress_bars()


def set_main_port(port: int) -> None:
    """The port the next process group meets on (after the last one was left)."""
    os.environ["MASTER_PORT"] = str(port)


_group_sockets: list[tuple[int, str]] = []  # (fd, inode) of the sockets the process group opened
_run_began_with: dict[int, str] = {}  # the sockets open as the current run began: fd -> inode
_left_groups: list[Any] = []  # process groups left after a stop, kept for the life of the engine
# Sent to every rank still running when a stop finds them all waiting in collectives, where no
# peer that leaves the group can fail them: its answer comes from a thread (see _Requests).
LEAVE_SIGNAL = signal.SIGRTMIN + 2


def leave_group() -> None:
    """Leave the process group, so that peers stuck in a collective with this rank fail at once.
    Its sockets are closed first (their fds then name /dev/null until the group closes them), as
    objects kept from earlier runs (a DDP model) hold the group, whose connections would stay open."""
    import torch.distributed as dist

    from nbfabric.launcher.keyed_store import close_servers
    from nbfabric.strategies.ddp import destroy_world_group

    close_servers()  # rank 0's store of the group, served on a thread, before its sockets go
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for fd, inode in _group_sockets:
            if _inode(fd) == inode:
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    _group_sockets.clear()
    if dist.is_available() and dist.is_initialized():
        _left_groups.append(dist.group.WORLD)  # freeing it would unregister fds gloo no longer owns
        destroy_world_group()


@contextmanager
def _noting_group_sockets() -> Iterator[None]:
    """Around a run: note the sockets of the process groups the run creates, the world's or more
    (DeepSpeed's, a device mesh's), see `leave_group`."""
    groups, before = _group_count(), _sockets()
    _run_began_with.clear()
    _run_began_with.update(before)
    try:
        yield
    finally:
        if _group_count() > groups:
            _group_sockets[:] = sorted(set(_group_sockets) | (set(_sockets().items()) - set(before.items())))


def _break_collectives() -> None:
    """While the main thread waits in a collective: shut down the connections that the process
    group's listening sockets accepted, which fails the collective here and on the peer at the
    other end (each rank does the same for its own); the main thread then leaves the collective,
    and the group is left as after any stop (`leave_group`). The group's sockets are those noted,
    or, in the run that made the group, those opened since it began."""
    import psutil

    opened = {fd for fd, inode in _sockets().items() if _run_began_with.get(fd) != inode}
    ours = {fd for fd, _ in _group_sockets} | opened
    connections = [c for c in psutil.Process().net_connections(kind="tcp") if c.fd in ours]
    store_port = int(os.environ.get("MASTER_PORT") or 0)  # the group's store: left to leave_group
    listening = {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN and c.laddr.port != store_port}
    for connection in connections:
        if connection.status == psutil.CONN_ESTABLISHED and connection.laddr.port in listening:
            try:
                accepted = socket.fromfd(connection.fd, socket.AF_INET, socket.SOCK_STREAM)  # a copy of the fd
            except OSError:
                continue  # closed meanwhile
            try:
                accepted.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                accepted.close()


def _group_count() -> int:
    """How many process groups this process is in."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return len(dist.distributed_c10d._world.pg_map)


def _sockets() -> dict[int, str]:
    """This process's open sockets: fd -> inode."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        inode = _inode(int(name))
        if inode:
            found[int(name)] = inode
    return found


def _inode(fd: int) -> str:
    """The socket that `fd` is ("socket:[inode]"), or "" (not a socket, or closed); fstat costs a
    third of reading the descriptor's link."""
    try:
        status = os.fstat(fd)
    except OSError:
        return ""
    return f"socket:[{status.st_ino}]" if stat.S_ISSOCK(status.st_mode) else ""


def run(payload: bytes, after_stop: bool = False) -> tuple[str, Any]:
    """Run a launcher's pickled rank callable in this rank: ("done", rank 0's pickled value or None)
    or ("failed", Failure). Output and metrics stream meanwhile. `after_stop`: the pool's previous
    run was stopped or failed (what it set up goes on from a fresh state)."""
    from nbfabric.launcher.rank_links import RankLinks, set_rank_links

    rank = int(os.environ["RANK"])
    channel = EngineChannel()
    try:
        with output_to(channel), _requests().answering(channel):
            try:
                with _interruptible():
                    rank_main = pickle.loads(payload)
                    set_rank_links(RankLinks(channel, after_stop=after_stop))
                    with _noting_group_sockets():
                        value = rank_main()
                return "done", pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL) if rank == 0 else None
            except SystemExit as exc:
                if exit_code(exc) != 0:
                    return "failed", Failure.from_exception(rank, exc)
                return "left", Left(rank, 0, where_raised(exc), now())  # as a forked rank: it left the run, which goes on
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to the notebook
                return "failed", Failure.from_exception(rank, exc)
            finally:
                set_rank_links(None)
                _close_store_of_an_ended_group()
    finally:
        channel.close()  # its last batch leaves before the reply, on the socket the notebook waits on for output


def _close_store_of_an_ended_group() -> None:
    """A run that leaves this rank outside any process group (its code called destroy_process_group,
    or a join never finished): rank 0's store of that group goes now, before it reports back, so
    that no rank of the next run, which meets at the same port, reaches the old one."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and not dist.is_initialized():
        from nbfabric.launcher.keyed_store import close_servers

        close_servers()


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt while the run goes on (the notebook's stop), and only then."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a late stop request must not cut the report short


class _Requests:
    """This engine's answers to a request for its stack (stacks.WHERE_SIGNAL: a ("stacks", text)
    event to the current run) and to LEAVE_SIGNAL (the collective the run waits in is broken). Both
    are written by faulthandler into a pipe that a thread of the engine reads, so they are answered
    while the main thread waits in a collective; between runs they go nowhere (the pipes do not
    block). Made, and the signals taken (LEAVE_SIGNAL would end the engine otherwise), once."""

    def __init__(self):
        import faulthandler

        from nbfabric.launcher import stacks

        self._stacks, write_end = os.pipe()
        os.set_blocking(write_end, False)
        stacks.listen(write_end)
        self._leave, leave_write = os.pipe()
        os.set_blocking(leave_write, False)
        faulthandler.register(LEAVE_SIGNAL, file=leave_write, all_threads=False, chain=False)
        self._header = stacks.header()
        self._channel: EngineChannel | None = None
        self._lock = threading.Lock()  # held while a request is answered: a run ends after its answer
        threading.Thread(target=self._serve, name="nbfabric-where", daemon=True).start()

    @contextmanager
    def answering(self, channel: EngineChannel) -> Iterator[None]:
        with self._lock:
            self._channel = channel
        try:
            yield
        finally:
            with self._lock:
                self._answer_stacks(quiet=0.0)  # a dump that came as the run ended: the launcher may wait for it
                self._channel = None

    def _serve(self) -> None:
        import select

        while True:
            ready = select.select([self._stacks, self._leave], [], [])[0]
            with self._lock:
                if self._leave in ready:
                    _drain(self._leave, quiet=0.05)
                    if self._channel is not None:
                        _break_collectives()
                if self._stacks in ready:
                    self._answer_stacks(quiet=0.05)

    def _answer_stacks(self, quiet: float) -> None:
        """Send the dump the stack pipe holds to the current run (with the lock held)."""
        text = _drain(self._stacks, quiet=quiet)  # the listener's header, at first
        if self._channel is not None and text.strip():
            self._channel.send(("stacks", self._header + text))


@functools.cache
def _requests() -> _Requests:
    return _Requests()


def _drain(fd: int, quiet: float = 0.0) -> str:
    """What the pipe holds, reading on until nothing more arrives for `quiet` s."""
    import select

    chunks = []
    while select.select([fd], [], [], quiet)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _address(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return "127.0.0.1"
