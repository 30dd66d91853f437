"""Rank output split into lines and progress updates, whatever the chunks the pipe delivers."""

from __future__ import annotations

import random

import pytest

from nbfabric.launcher.output import LineSplitter

STREAM = "epoch 1\r\n10%\r50%\r100%\nhé llo\r\rtail\r".encode()
EXPECTED = [("epoch 1", False), ("10%", True), ("50%", True), ("100%", False), ("hé llo", True), ("tail", False)]


def _split(data: bytes, sizes) -> list[tuple[str, bool]]:
    splitter, segments, start = LineSplitter(), [], 0
    for size in sizes:
        segments += splitter.feed(data[start : start + size])
        start += size
    return segments + splitter.feed(data[start:]) + splitter.close()


def test_lines_progress_and_crlf_in_one_chunk():
    assert _split(STREAM, []) == EXPECTED


@pytest.mark.parametrize("seed", range(20))
def test_any_chunking_gives_the_same_segments(seed):
    generator = random.Random(seed)
    sizes = [generator.randint(1, 4) for _ in range(len(STREAM))]
    assert _split(STREAM, sizes) == EXPECTED


def test_a_long_line_without_newline_fed_in_many_chunks_arrives_whole():
    data = b"x" * (1 << 22)
    assert _split(data, [1 << 12] * (1 << 10)) == [("x" * (1 << 22), False)]
