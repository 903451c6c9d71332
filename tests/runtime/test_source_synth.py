"""synth://: a camera over the synthetic slide while the stage moves between known stops."""
from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.runtime.sources import open_source
from cyto_edge.runtime.sources.synthetic import SyntheticStageSource

SMALL = "synth://?seed=2&fps=10&width=320&height=240&stops=5&dwell=0.5&move=0.3&slide_width=960&slide_height=720"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CYTO_EDGE_CACHE", str(tmp_path_factory.getbasetemp() / "synth-source-cache"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """All frames of one pass over the small schedule (realtime=0), and the source after it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CYTO_EDGE_CACHE", str(tmp_path_factory.getbasetemp() / "synth-source-cache"))
    src = open_source(SMALL + "&realtime=0")
    frames = list(iter(src.read, None))
    yield src, frames
    src.close()
    mp.undo()


def sharpness(img: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.CV_32F).var())


def test_one_pass_visits_every_stop_and_ends(run):
    src, frames = run
    assert isinstance(src, SyntheticStageSource) and len(src.schedule) == 5
    assert len(frames) == round(src.duration_s * 10) == 37
    assert [f.index for f in frames] == list(range(37))
    assert all(f.meta["t"] == pytest.approx(f.index / 10) for f in frames)
    assert all(b.timestamp >= a.timestamp for a, b in zip(frames, frames[1:]))
    assert src.read() is None and src.read() is None and src.state == "ended"
    for f in frames:
        assert f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8 and f.image.flags.c_contiguous
    for stop in src.schedule:
        at = [f for f in frames if f.meta["stop_id"] == stop["id"]]
        assert len(at) == 5  # dwell 0.5 s at 10 fps
        assert all((f.meta["stage_x"], f.meta["stage_y"]) == (stop["x"], stop["y"]) for f in at)
        assert all(not f.meta["moving"] and f.meta["empty"] == stop["empty"] for f in at)


def test_moving_frames_are_marked_and_travel_between_stops(run):
    src, frames = run
    moving = [f for f in frames if f.meta["moving"]]
    assert len(moving) == 4 * 3  # 4 moves of 0.3 s
    assert all(f.meta["stop_id"] is None and not f.meta["sharp"] for f in moving)
    xs = np.array([[s["x"], s["y"]] for s in src.schedule])
    lo, hi = xs.min(0), xs.max(0)
    for f in moving:
        assert lo[0] <= f.meta["stage_x"] <= hi[0] and lo[1] <= f.meta["stage_y"] <= hi[1]
    positions = [(f.meta["stage_x"], f.meta["stage_y"]) for f in moving]
    assert len(set(positions)) == len(positions)  # the view moves every frame
    # motion blur: a moving frame is less sharp than the settled still frame of a non-empty stop
    full = [s["id"] for s in src.schedule if not s["empty"]]
    still = max(sharpness(f.image) for f in frames if f.meta["stop_id"] in full and f.meta["sharp"])
    assert np.median([sharpness(f.image) for f in moving]) < 0.5 * still


def test_focus_drifts_in_and_still_frames_carry_noise(run):
    src, frames = run
    for stop in src.schedule:
        at = [f for f in frames if f.meta["stop_id"] == stop["id"]]
        assert not at[0].meta["sharp"] and at[-1].meta["sharp"]
        assert at[0].meta["focus_sigma_px"] > at[-1].meta["focus_sigma_px"] == 0.0
        a, b = at[-2].image.astype(np.int16), at[-1].image.astype(np.int16)
        diff = np.abs(a - b)
        assert diff.max() > 0 and diff.mean() < 3.0  # the same view, fresh sensor noise
        if not stop["empty"]:
            assert sharpness(at[0].image) < 0.7 * sharpness(at[-1].image)


def test_empty_stops_show_no_cells(run):
    src, frames = run
    empty = [s for s in src.schedule if s["empty"]]
    full = [s for s in src.schedule if not s["empty"]]
    assert empty and full
    for s in full:
        assert s["truth"]["squamous_count"] > 0 and s["truth"]["nuclei_count"] > 0
    dark = {}
    for s in src.schedule:  # fraction of clearly stained pixels in the settled view
        img = [f for f in frames if f.meta["stop_id"] == s["id"]][-1].image
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        dark[s["id"]] = float((hsv[..., 1] > 60).mean())
    assert max(dark[s["id"]] for s in empty) < 0.01 < min(dark[s["id"]] for s in full)


def test_loop_goes_round_again():
    with open_source(SMALL + "&realtime=0&loop=1") as src:
        frames = [src.read() for _ in range(60)]
    assert all(f is not None for f in frames)
    assert [f.meta["stop_id"] for f in frames[37:45]].count(0) >= 1
    assert frames[-1].meta["visit"] == 1 and frames[0].meta["visit"] == 0


def test_realtime_paces_frames_and_a_late_reader_skips():
    with open_source(SMALL.replace("fps=10", "fps=25") + "&realtime=1") as src:
        t0 = time.monotonic()
        first = [src.read() for _ in range(6)]
        elapsed = time.monotonic() - t0
        assert elapsed >= 5 / 25 - 0.01
        assert [f.index for f in first] == list(range(6))
        time.sleep(0.4)
        late = src.read()
    assert late.index >= 6 + 8 and src.skipped >= 8
    assert late.meta["t"] == pytest.approx(late.index / 25)


def test_slide_is_cached_between_opens(tmp_path, monkeypatch):
    monkeypatch.setenv("CYTO_EDGE_CACHE", str(tmp_path))
    with open_source(SMALL + "&realtime=0"):
        pass
    entries = list((tmp_path / "synth").iterdir())
    assert len(entries) == 1
    stamp = (entries[0] / "slide.jpg").stat().st_mtime_ns
    with open_source(SMALL + "&realtime=0", timeout_s=3.0) as src:  # common source options are accepted
        assert src.read() is not None
    assert (entries[0] / "slide.jpg").stat().st_mtime_ns == stamp and len(list((tmp_path / "synth").iterdir())) == 1


def test_path_reuses_a_written_slide(tmp_path):
    from cyto_edge.synth.slide import SlideParams, write_slide

    p = SlideParams(seed=4, width=960, height=720, view_w=320, view_h=240, stops=4, dwell_s=0.4, move_s=0.2, fps=10)
    write_slide(tmp_path / "slide", p)
    written = json.loads((tmp_path / "slide" / "schedule.json").read_text())
    uri = f"synth://?path={tmp_path / 'slide'}&realtime=0&width=320&height=240&stops=4&dwell=0.4&move=0.2&fps=10"
    with open_source(uri) as src:
        assert src.schedule == written["stops"]
        frames = list(iter(src.read, None))
    assert {f.meta["stop_id"] for f in frames} - {None} == {0, 1, 2, 3}
    with open_source(uri.replace("stops=4", "stops=6")) as src:  # another schedule over the same slide
        assert len(src.schedule) == 6 and all("truth" in s for s in src.schedule)


@pytest.mark.parametrize("query, needle", [
    ("fps=0", "fps"), ("bogus=1", "bogus"), ("width=abc", "width"), ("realtime=2", "realtime"),
    ("width=2000&slide_width=960&slide_height=720", "must fit"), ("path=/nonexistent/slide", "missing"),
])
def test_bad_options_are_one_line_errors(query, needle):
    with pytest.raises(BadInput) as e:
        open_source("synth://?" + query)
    assert needle in str(e.value) and "\n" not in str(e.value)
