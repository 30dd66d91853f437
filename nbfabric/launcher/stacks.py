"""Where each rank is: its Python stack, written by the rank on request at no cost until then.

A rank registers `faulthandler` for WHERE_SIGNAL on a file it shares with the process that started
it. The handler runs in C, so a rank answers while it waits inside a collective or native code.
The reader signals the rank, reads what it wrote, and keeps the rank's main thread."""

from __future__ import annotations

import ast
import faulthandler
import linecache
import os
import re
import signal
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass

from nbfabric.launcher.cell_labels import place_label
from nbfabric.tracebacks import PACKAGE_DIR

# Ignored by default: a request that reaches a process not (or no longer) listening harms nothing.
WHERE_SIGNAL = signal.SIGURG
HEADER = "nbfabric main thread "
_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-f]+)(?: \[[^\]]*\])? \(most recent call first\):$")
_FRAME = re.compile(r'^  File "(.*)", line (\d+) in (.*)$')
_LIBRARY_DIRS = tuple({sysconfig.get_paths()[key] + os.sep for key in ("stdlib", "platstdlib", "purelib", "platlib")})
_REPORTING = ("report_failure", "from_exception")  # nbfabric's functions that send a rank's failure
_PHASES = {  # nbfabric's functions a rank runs outside the user's code -> what the rank is doing there
    "become_rank": "starting",
    "_join": "joining the run",
    "pack_for_notebook": "packing the cell's names for the notebook",
    "watch_values": "taking note of the notebook's values the cell can change",
    "changed_in_place": "looking for the notebook's values the cell changed",
    "_join_threads": "waiting for the threads its code started",
    "run_rank": "sending its result",  # (outside the user's code, which run_rank also calls)
    **dict.fromkeys(_REPORTING, "reporting its failure"),
}
# a rank's calls once its part is done: the store client's wait for its peers, the worker's end
_FINISHED = ("wait_for_peers", "_announce_exit", "_stay_until_let_go")
_QUIET = 0.05  # seconds without new bytes after which a dump is taken as complete


def listen(fd: int) -> None:
    """Rank side: on WHERE_SIGNAL, write every thread's stack to `fd` (kept open for good), after
    a header that names this process's main thread."""
    os.write(fd, header().encode())
    faulthandler.register(WHERE_SIGNAL, file=fd, all_threads=True, chain=False)


def header() -> str:
    """The line that tells `parse` which of the dumped threads is this process's main thread."""
    return f"{HEADER}0x{threading.main_thread().ident:016x}\n"


@dataclass(frozen=True)
class Frame:
    filename: str
    line: int
    function: str

    @property
    def mine(self) -> bool:
        """The user's code: neither Python's nor an installed library's nor nbfabric's."""
        return not self.filename.startswith((*_LIBRARY_DIRS, PACKAGE_DIR)) and not self.filename.startswith("<frozen")

    @property
    def text(self) -> str:
        return linecache.getline(self.filename, self.line).strip()


@dataclass(frozen=True)
class RankPlace:
    """One rank's main-thread stack (innermost frame last), or why it could not be read, or that
    the rank has done its part and has no stack to show (`ended`: a pool's rank, idle)."""

    rank: int
    frames: tuple[Frame, ...] = ()
    missing: str = ""
    ended: bool = False

    @property
    def failing(self) -> bool:
        """Whether the rank was reporting an exception of its own (it failed by itself, not by the stop)."""
        return any(f.filename.startswith(PACKAGE_DIR) and f.function in _REPORTING for f in self.frames)

    @property
    def finished(self) -> bool:
        """Whether the rank has done its part of the run and waits for its peers to do theirs."""
        return self.ended or any(f.filename.startswith(PACKAGE_DIR) and f.function in _FINISHED for f in self.frames)

    @property
    def collective(self) -> str:
        """The torch.distributed call the rank waits in (its outermost frame there), or ""."""
        return _collective(self._in_rank())

    def summary(self) -> str:
        """"all_reduce at Cell In[7], line 12": what the rank waits in, at the user's innermost line."""
        if self.missing:
            return self.missing
        if self.finished:
            return "finished, waiting for the other ranks"
        frames = self._in_rank()
        mine = [i for i, frame in enumerate(frames) if frame.mine]
        if not mine:
            inner = frames[-1] if frames else None
            phase = _phase(frames)
            if phase:
                return phase
            return "no Python frame" if inner is None else f"{inner.function} at {place_label(inner.filename, inner.line)}"
        user = frames[mine[-1]]
        return f"{_waiting_in(user, frames[mine[-1] + 1:])} at {place_label(user.filename, user.line)}"

    def details(self, depth: int = 3) -> list[str]:
        """The innermost run of the user's frames (at most `depth`), each with its line of code."""
        if self.missing or self.finished:
            return []
        frames: list[Frame] = []
        for frame in reversed(self._in_rank()):
            if frame.mine:
                frames.insert(0, frame)
            elif frames:
                break
        frames = frames[-depth:] or list(self.frames[-1:])
        return [f"{place_label(f.filename, f.line)}, in {f.function}: {f.text}" for f in frames]

    def _in_rank(self) -> tuple[Frame, ...]:
        """The frames inside nbfabric's outermost one (the rank's entry): what the rank runs, not
        the code that started it (a forked rank's stack begins with the cell that launched it)."""
        for index, frame in enumerate(self.frames):
            if frame.filename.startswith(PACKAGE_DIR):
                return self.frames[index:]
        return self.frames


def _phase(frames: tuple[Frame, ...]) -> str:
    """What nbfabric's own code was doing in the rank, outside the user's code: the innermost of
    its steps that the frames show ("joining the run (init_process_group)"), or ""."""
    for index in range(len(frames) - 1, -1, -1):
        frame = frames[index]
        phase = _PHASES.get(frame.function) if frame.filename.startswith(PACKAGE_DIR) else None
        if phase:
            collective = _collective(frames[index + 1:])
            return f"{phase} ({collective})" if collective else phase
    return ""


def _waiting_in(user: Frame, inside: tuple[Frame, ...]) -> str:
    """The collective a rank waits in (torch.distributed's outermost frame), else the call on the
    user's line (a native call such as time.sleep leaves no frame of its own)."""
    return _collective(inside) or _call_on(user.text, in_lambda=user.function == "<lambda>") or (inside[0].function if inside else user.function)


def _collective(frames: tuple[Frame, ...]) -> str:
    for frame in frames:
        if f"{os.sep}torch{os.sep}distributed{os.sep}" in frame.filename and frame.function not in ("wrapper", "<lambda>"):
            return frame.function
    return ""


def _call_on(line: str, in_lambda: bool = False) -> str:
    """The outermost call on a line of code, as written (`time.sleep`), or "" (`in_lambda`: the
    outermost call inside the line's lambda)."""
    try:
        tree: ast.AST = ast.parse(line.strip().rstrip(":") or "pass")
    except SyntaxError:
        return ""
    if in_lambda:
        tree = next((node.body for node in ast.walk(tree) if isinstance(node, ast.Lambda)), tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            return ast.unparse(node.func)
    return ""


def parse(dump: str, rank: int) -> RankPlace:
    """The main thread's frames in what a rank wrote (header first, then faulthandler's dump)."""
    main = None
    threads: dict[str, list[Frame]] = {}
    current: list[Frame] | None = None
    current_thread: list[Frame] | None = None  # the thread that wrote the dump, should no header say
    for line in dump.splitlines():
        if line.startswith(HEADER):
            main = line[len(HEADER):].strip()
            continue
        thread = _THREAD.match(line)
        if thread:
            current = threads[thread.group(1)] = []
            if line.startswith("Current"):
                current_thread = current
            continue
        frame = _FRAME.match(line)
        if frame and current is not None:
            current.append(Frame(frame.group(1), int(frame.group(2)), frame.group(3)))
    frames = threads.get(main) if main is not None else current_thread
    if frames is None:
        return RankPlace(rank, missing="its stack could not be read")
    return RankPlace(rank, tuple(reversed(frames)))


class StackFile:
    """The reader's side of one rank's stack file, which both processes hold: a file in memory
    (Linux), else (macOS, or a sandbox that forbids it) an unlinked temporary file."""

    def __init__(self):
        try:
            self.fd = os.memfd_create("nbfabric-stack", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            self.fd, path = tempfile.mkstemp(prefix="stack-")
            os.unlink(path)

    def close(self) -> None:
        os.close(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def read(self) -> str:
        return os.pread(self.fd, self.size(), 0).decode(errors="replace")


def take(ranks: dict[int, tuple[int, StackFile]], wait: float = 1.0) -> dict[int, RankPlace]:
    """Ask each rank (rank -> (pid, its stack file)) where it is; give each at most `wait` s to answer."""
    before = {rank: file.size() for rank, (_, file) in ranks.items()}
    asked = {}
    for rank, (pid, _) in ranks.items():
        asked[rank] = _running(pid)
        if asked[rank]:
            os.kill(pid, WHERE_SIGNAL)
    deadline = time.monotonic() + wait
    sizes = dict(before)
    quiet_since = {rank: None for rank in ranks}
    while time.monotonic() < deadline:
        for rank, (_, file) in ranks.items():
            size = file.size()
            if size != sizes[rank]:
                sizes[rank], quiet_since[rank] = size, time.monotonic()
        waiting = [r for r in ranks if asked[r] and (quiet_since[r] is None or time.monotonic() - quiet_since[r] < _QUIET)]
        if not waiting:
            break
        time.sleep(0.01)
    places = {}
    for rank, (_, file) in ranks.items():
        text = file.read()
        if sizes[rank] == before[rank] or not before[rank]:  # not listening yet when asked: its header at most
            why = "it has ended" if not asked[rank] else "it was still starting" if not before[rank] else "it did not answer"
            places[rank] = RankPlace(rank, missing=why)
            continue
        header, _, _ = text.partition("\n")
        places[rank] = parse(header + "\n" + text[before[rank]:], rank)
    return places


def _running(pid: int) -> bool:
    """Whether the process runs (not ended, nor ended and waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def describe(places: dict[int, RankPlace]) -> str:
    """One line: "rank 0: all_reduce at Cell In[7], line 12; rank 1: time.sleep at Cell In[7], line 9"."""
    return "; ".join(f"rank {rank}: {places[rank].summary()}" for rank in sorted(places))


def describe_in_full(places: dict[int, RankPlace]) -> str:
    """Each rank's summary and the user's innermost frames, one block per rank."""
    blocks = []
    for rank in sorted(places):
        place = places[rank]
        blocks.append(f"rank {rank}: {place.summary()}")
        blocks += [f"    {line}" for line in place.details()]
    return "\n".join(blocks)
