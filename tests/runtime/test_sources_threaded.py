"""LatestFrameReader: newest frame only (a slow consumer never gets an old frame, drops are counted),
reconnect with back-off after a source fails, clean stop."""
from __future__ import annotations

import threading
import time

import numpy as np

from cyto_edge.runtime.sources import Frame
from cyto_edge.runtime.sources.folder import FolderSource
from cyto_edge.runtime.sources.threaded import LatestFrameReader


class TickSource:
    """A live camera at `period` s per frame; `produced` is the number of frames returned so far.
    Between frames `fail_from` and `fail_to` it is unplugged: raises for the first half of the outage,
    returns None for the second (both ways a driver may fail)."""

    uri = "test://tick"
    live = True

    def __init__(self, period=0.002, fail_from=None, fail_to=None):
        self.period, self.fail_from, self.fail_to = period, fail_from, fail_to
        self.produced, self.calls, self.reconnect_calls, self.closed = 0, 0, 0, False
        self._img = np.zeros((8, 8, 3), np.uint8)

    def read(self):
        self.calls += 1
        time.sleep(self.period)
        if self.fail_from is not None and self.fail_from <= self.calls < self.fail_to:
            if self.calls < (self.fail_from + self.fail_to) // 2:
                raise ConnectionError("camera unplugged")
            return None
        f = Frame(self._img, self.produced, time.monotonic())
        self.produced += 1
        return f

    def reconnect(self):
        self.reconnect_calls += 1

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_slow_consumer_sees_only_the_newest_frames():
    src = TickSource(period=0.001)
    with LatestFrameReader(src) as cam:
        got, lag = [], []
        for _ in range(15):
            time.sleep(0.02)                                     # the consumer is ~20x slower
            before = src.produced
            f = cam.read(timeout=1.0)
            assert f is not None
            got.append(f.index)
            lag.append(before - f.index)
        stats = cam.stats()
    assert all(b > a for a, b in zip(got, got[1:])), got         # never an old (or the same) frame
    assert max(np.diff(got)) > 3                                  # frames in between were skipped ...
    assert stats["dropped"] >= sum(d - 1 for d in np.diff(got))   # ... and counted
    assert max(lag) <= 3, lag                                     # each read is (one of) the newest
    assert stats["delivered"] == 15 and src.closed
    assert stats["dropped"] + stats["delivered"] <= stats["frames"] <= stats["dropped"] + stats["delivered"] + 1


def test_read_times_out_without_a_new_frame_and_does_not_repeat():
    src = TickSource(period=0.3)
    with LatestFrameReader(src) as cam:
        first = cam.read(timeout=2.0)
        assert first is not None
        t0 = time.monotonic()
        assert cam.read(timeout=0.05) is None                     # nothing new yet: no repeat of `first`
        assert time.monotonic() - t0 < 0.25
        second = cam.read(timeout=2.0)
        assert second is not None and second.index == first.index + 1


def test_source_that_disconnects_and_returns():
    src = TickSource(period=0.002, fail_from=30, fail_to=50)
    cam = LatestFrameReader(src, backoff_s=0.01, backoff_max_s=0.05)
    indices = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5 and (cam.reconnects < 1 or len(indices) < 5 or src.produced < 40):
        f = cam.read(timeout=0.05)
        if f is not None:
            indices.append(f.index)
    cam.close()
    states = [s for _, s in cam.transitions]
    assert states[:2] == ["connecting", "live"]
    assert "lost" in states and states[states.index("lost") + 1] == "live"   # back after the outage
    assert states[-1] == "ended"
    assert cam.failures == 20 and cam.reconnects == 1
    assert src.reconnect_calls == 20                           # asked to reconnect after each failure
    assert "ConnectionError: camera unplugged" in cam.error or "no frame" in cam.error
    assert src.produced >= 40 and indices[-1] >= 30            # frames flowed again after the outage


def test_backoff_grows_and_max_failures_ends():
    class Dead:
        uri, live = "test://dead", True

        def __init__(self):
            self.times = []

        def read(self):
            self.times.append(time.monotonic())
            raise OSError("no device")

        def close(self):
            pass

    src = Dead()
    cam = LatestFrameReader(src, backoff_s=0.02, backoff_max_s=0.08, max_failures=5)
    assert cam.read(timeout=3.0) is None
    assert cam.ended and cam.state == "ended" and "no device" in cam.error
    gaps = np.diff(src.times)
    assert len(src.times) == 6
    assert gaps[0] >= 0.018 and gaps[1] >= 0.038 and gaps[3] >= 0.075 and gaps[4] < 0.5   # 20, 40, 80, 80 ms
    cam.close()


def test_file_source_ends_and_reader_reports_it(tmp_path):
    import cv2

    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((10, 10, 3), i * 50, np.uint8))
    cam = LatestFrameReader(FolderSource(str(tmp_path)))
    got = []
    while (f := cam.read(timeout=2.0)) is not None:
        got.append(f.index)
        time.sleep(0.01)
    assert cam.ended and cam.state == "ended" and got and got == sorted(got)
    assert cam.frames == 4 and cam.failures == 0
    cam.close()


def test_fps_estimate_and_clean_stop():
    src = TickSource(period=0.01)
    cam = LatestFrameReader(src)
    time.sleep(0.5)
    assert 20 < cam.fps < 150
    cam.close()
    assert not cam._thread.is_alive() and src.closed and cam.state == "ended"
    assert cam.read(timeout=0.01) is None or cam.ended


def test_close_unblocks_a_source_stuck_in_read():
    class Stuck:
        uri, live = "test://stuck", True

        def __init__(self):
            self.release = threading.Event()

        def read(self):
            self.release.wait(10)
            return None

        def close(self):
            self.release.set()

    src = Stuck()
    cam = LatestFrameReader(src)
    time.sleep(0.05)
    t0 = time.monotonic()
    cam.close(timeout=2.0)
    assert time.monotonic() - t0 < 1.5 and not cam._thread.is_alive()


def test_frames_are_not_reordered():
    src = TickSource(period=0.001)
    with LatestFrameReader(src) as cam:
        a = cam.read(timeout=1)
        b = cam.read(timeout=1)
    assert a is not None and b is not None and b.index > a.index and b.timestamp >= a.timestamp
