"""What each rank uses, measured from outside it about once a second: in the run's outcome, on the
dashboard, in the end summary, and in the error that names a rank killed for memory."""

from __future__ import annotations

import os
import signal
import time

import pytest

from nbfabric import Fabric, RankError
from nbfabric.launcher.output import Sink
from nbfabric.launcher.usage import UsageMeter, size
from nbfabric.notebook.tally import RunTally

pytestmark = pytest.mark.usefixtures("no_leaks")  # a leak fails the test that made it (tests/conftest.py)

MB = 1 << 20


def test_the_meter_sees_a_process_allocate_and_the_tally_keeps_the_peak():
    meter, tally = UsageMeter({0: os.getpid()}), RunTally(1)
    try:
        before = meter.sample()[0].rss
        held = bytearray(200 * MB)
        tally.usage(meter.sample())
        during = meter.last[0].rss
        del held
        tally.usage(meter.sample())
        assert during - before >= 190 * MB
        assert tally.usage_peak[0].rss >= during
        assert meter.last[0].gpu_memory is None  # no GPU here
    finally:
        meter.close()


def test_a_sample_taken_while_a_killed_rank_tears_its_memory_down_keeps_the_last_figure(monkeypatch):
    """A rank killed by SIGKILL shows 0 B resident while its memory is torn down: the figure its
    error gives (\"used ... when last measured\", the out-of-memory hint) stays the one before."""
    import psutil

    meter = UsageMeter({0: os.getpid()})
    try:
        measured = meter.sample()[0].rss
        torn_down = psutil.Process().memory_info()._replace(rss=0)
        monkeypatch.setattr(psutil.Process, "memory_info", lambda self: torn_down)
        assert meter.sample() == {}
        assert meter.last[0].rss == measured > 0
    finally:
        meter.close()


def test_sizes_read_as_people_read_them():
    assert (size(512 * MB), size(3 * 1024 * MB + 200 * MB), size(12 * 1024 * MB), size(900)) == ("512 MB", "3.2 GB", "12 GB", "900 B")


def _killed_after_allocating(measured):
    def train(fabric):
        if fabric.global_rank == 1:
            held = bytearray(400 * MB)  # noqa: F841 - held until the end
            while not measured.exists():
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
        time.sleep(60)

    return train


class _NoteWhenMeasured(Sink):
    """Creates `measured` once a measurement saw rank 1's 400 MB."""

    def __init__(self, measured):
        self.measured = measured

    def usage(self, usage):
        if 1 in usage and usage[1].rss >= 400 * MB:
            self.measured.touch()


def test_a_rank_killed_for_memory_is_named_with_its_last_measured_figure(tmp_path):
    measured = tmp_path / "measured"
    with pytest.raises(RankError) as caught:
        Fabric(accelerator="cpu", devices=2)._launch(_killed_after_allocating(measured), sink=_NoteWhenMeasured(measured))
    error = caught.value
    assert error.rank == 1 and error.summary == "killed by SIGKILL"
    assert error.usage[1].rss >= 400 * MB
    assert f"A rank killed by SIGKILL has often run out of memory. Rank 1 used {error.usage[1].text()} when last measured." in str(error)
