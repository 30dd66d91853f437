"""Rank output: split byte streams into lines, and the sinks that show them tagged by rank."""

from __future__ import annotations

import codecs
import sys
import time
from typing import Any, TextIO

from nbfabric.channel import Display, Metrics


class LineSplitter:
    """Turns the bytes of one stream into lines ending in "\\n", and progress updates ending in "\\r".
    Linear in what it is fed: each chunk is scanned once, and an unfinished line is joined once."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []  # the unfinished segment
        self._carriage = False  # the segment ended in "\r" at the end of the last chunk: "\n" may follow

    def feed(self, chunk: bytes) -> list[tuple[str, bool]]:
        """Return (text, is_progress) for each segment completed by `chunk`."""
        text = self._decoder.decode(chunk)
        segments: list[tuple[str, bool]] = []
        if self._carriage and text:
            self._carriage = False
            segments.append((self._take(""), not text.startswith("\n")))
            text = text[1:] if text.startswith("\n") else text
        start, end = 0, len(text)
        newline, carriage = text.find("\n"), text.find("\r")
        while True:
            if 0 <= newline < start:
                newline = text.find("\n", start)
            if 0 <= carriage < start:
                carriage = text.find("\r", start)
            cut = min(newline, carriage) if newline >= 0 and carriage >= 0 else max(newline, carriage)
            if cut < 0:
                break
            piece = text[start:cut]
            if text[cut] == "\n" or text.startswith("\n", cut + 1):
                segments.append((self._take(piece), False))
                start = cut + (1 if text[cut] == "\n" else 2)
            elif cut + 1 == end:
                self._parts.append(piece)
                self._carriage = True
                start = end
            else:
                segments.append((self._take(piece), True))
                start = cut + 1
        if start < end:
            self._parts.append(text[start:])
        return [(segment, progress) for segment, progress in segments if segment or not progress]

    def close(self) -> list[tuple[str, bool]]:
        """The unterminated rest, as a final line."""
        rest = self._take(self._decoder.decode(b"", final=True))
        self._carriage = False
        return [(rest, False)] if rest else []

    def _take(self, last: str) -> str:
        self._parts.append(last)
        text = "".join(self._parts)
        self._parts = []
        return text


def emit_segments(sink: Sink, rank: int, stream: str, segments: list[tuple[str, bool]]) -> None:
    """Pass what a LineSplitter made of a rank's stream to `sink`: lines, and progress redraws."""
    for text, is_progress in segments:
        (sink.progress if is_progress else sink.line)(rank, stream, text)


def parse_rank_filter(value: str, world_size: int) -> set[int] | None:
    """`--ranks`: "all" (None) or a comma list of ranks; ValueError naming the valid ones otherwise."""
    if value == "all":
        return None
    try:
        ranks = {int(part) for part in value.split(",") if part.strip()}
    except ValueError:
        ranks = set()
    if not ranks or not all(0 <= rank < world_size for rank in ranks):
        raise ValueError(f"--ranks={value!r} is not valid; use all, or ranks from 0 to {world_size - 1} such as 0 or 0,1")
    return ranks


class Sink:
    """Receives what ranks produce while they run; subclasses show it somewhere."""

    def line(self, rank: int, stream: str, text: str) -> None:
        """A complete line that `rank` wrote to `stream` ("stdout" or "stderr")."""

    def progress(self, rank: int, stream: str, text: str) -> None:
        """A line that replaces itself (a progress bar redraw)."""

    def metrics(self, event: Metrics) -> None:
        """Values the rank logged."""

    def display(self, event: Display) -> None:
        """Rich output the rank displayed (a figure, a table)."""

    def places(self, places: dict, *, live: bool) -> None:
        """Where the ranks are (rank -> stacks.RankPlace): `live`, as asked while the run goes on
        (`take_where_request`), else where the ranks still running were when the run began to stop."""

    def usage(self, usage: dict) -> None:
        """What each rank uses now (rank -> usage.Usage), about once a second."""

    def take_where_request(self) -> bool:
        """Whether someone asked, since the last call, where the ranks are (a Where button, %fabric where)."""
        return False

    def rank_exited(self, rank: int, returncode: int) -> None:
        """The rank's process ended."""

    def flush(self) -> None:
        """Everything received so far has been passed on; a good moment to show it."""

    def tick(self) -> bool:
        """Called about every 0.1 s while ranks run (a dashboard can handle its buttons here);
        return True to stop every rank, as an interrupt would."""
        return False

    def close(self) -> None:
        """Every rank has ended: show what is still held back."""


class TextSink(Sink):
    """Writes "[rank N] ..." lines to this process's stdout and stderr.

    Progress redraws replace the previous one where the stream understands "\r" (a terminal), show
    as one line per rank updated in place in a Jupyter kernel (with `in_place_progress=True`), and
    are dropped elsewhere. Rich output shows as in a plain cell in IPython (after a "[rank N]" line
    for ranks other than 0), as its text elsewhere.
    """

    def __init__(
        self,
        ranks: set[int] | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        in_place_progress: bool | None = None,
    ):
        self.ranks = ranks
        self.in_place_progress = in_place_progress
        self._streams = {"stdout": stdout, "stderr": stderr}
        self._mid_progress: set[str] = set()
        self._written: set[str] = set()
        self._bars: RankBars | None = None

    def _stream(self, name: str) -> TextIO:
        self._written.add(name)
        return self._streams[name] or getattr(sys, name)

    def line(self, rank: int, stream: str, text: str) -> None:
        if self.ranks is None or rank in self.ranks:
            if self._bars is not None and self._bars.finish(rank, stream, text):
                return  # written over the rank's progress display, as a terminal writes over its bar
            out = self._stream(stream)
            if stream in self._mid_progress:
                self._mid_progress.discard(stream)
                out.write("\r\033[K")
            out.write(f"[rank {rank}] {text}\n")

    def progress(self, rank: int, stream: str, text: str) -> None:
        if self.ranks is not None and rank not in self.ranks:
            return
        out = self._stream(stream)
        if self.in_place_progress and _kernel_stream(out):
            self._bars = self._bars or RankBars()
            self._bars.set(rank, stream, text)
        elif out.isatty() if self.in_place_progress is None else self.in_place_progress:
            self._mid_progress.add(stream)
            out.write(f"\r\033[K[rank {rank}] {text}")

    def display(self, event: Display) -> None:
        if self.ranks is not None and event.rank not in self.ranks:
            return
        self.line(event.rank, "stdout", "")  # whose it is, on a line of its own before it
        self.flush()  # the lines before it show before it
        shell = _ipython_shell()
        if shell is not None:
            shell.display_pub.publish(data=event.data, metadata=event.metadata)
        else:
            for text in str(event.data.get("text/plain", "")).splitlines() or [""]:
                self.line(event.rank, "stdout", text)

    def flush(self) -> None:
        """Flush the streams written since the last flush (in a kernel, each flush waits for its IO thread)."""
        for name in sorted(self._written):
            self._stream(name).flush()
        self._written.clear()
        if self._bars is not None:
            self._bars.show()

    def close(self) -> None:
        self.flush()
        if self._bars is not None:
            self._bars.show(final=True)


class RankBars:
    """In a Jupyter kernel: each rank's latest progress line on each stream in a display of its own,
    updated in place at most every BAR_EVERY seconds; the line that ends it is written over it."""

    def __init__(self):
        self._latest: dict[tuple[int, str], str] = {}  # (rank, stream) -> its latest progress line
        self._shown: dict[tuple[int, str], str] = {}
        self._handles: dict[tuple[int, str], Any] = {}
        self._updated = 0.0

    def set(self, rank: int, stream: str, text: str) -> None:
        self._latest[(rank, stream)] = text

    def finish(self, rank: int, stream: str, text: str) -> bool:
        """A line that follows the rank's progress on this stream ends it: the display shows that
        line for good (True), or, where the progress was never shown, nothing is (False). The next
        progress line starts a display of its own."""
        key = (rank, stream)
        self._latest.pop(key, None)
        self._shown.pop(key, None)
        handle = self._handles.pop(key, None)
        if handle is not None:
            handle.update(_bar_bundle(rank, text), raw=True)
        return handle is not None

    def show(self, final: bool = False) -> None:
        from IPython.display import display

        now = time.monotonic()
        if not final and now - self._updated < BAR_EVERY:
            return
        self._updated = now
        for key, text in sorted(self._latest.items()):
            if self._shown.get(key) == text:
                continue
            bundle = _bar_bundle(key[0], text)
            if key in self._handles:
                self._handles[key].update(bundle, raw=True)
            else:
                self._handles[key] = display(bundle, raw=True, display_id=True)
            self._shown[key] = text


def _bar_bundle(rank: int, text: str) -> dict[str, str]:
    return {"text/plain": f"[rank {rank}] {text}"}


BAR_EVERY = 0.25  # seconds between two updates of the progress displays


def _ipython_shell() -> Any:
    interactive = sys.modules.get("IPython.core.interactiveshell")
    if interactive is None or not interactive.InteractiveShell.initialized():
        return None
    return interactive.InteractiveShell.instance()


def _kernel_stream(stream: TextIO) -> bool:
    """Whether `stream` sends to a Jupyter frontend (ipykernel's OutStream)."""
    return type(stream).__module__.startswith("ipykernel")
