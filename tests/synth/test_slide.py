"""The synthetic slide and its stop schedule: layout, empty regions, truth per stop, cache, OUT/slide."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cyto_edge.cli import main
from cyto_edge.errors import BadInput
from cyto_edge.synth.slide import SlideParams, cache_root, cached_slide_dir, load_slide, stop_positions

P = SlideParams(seed=1, width=1280, height=960, view_w=400, view_h=300, stops=7, dwell_s=1.0, move_s=0.5, fps=15)


@pytest.fixture(scope="module")
def slide():
    return load_slide(cached_slide_dir(P))


def test_schedule_document(slide):
    doc = slide.schedule
    assert doc["camera"] == {"width": 400, "height": 300, "fps": 15, "move_s": 0.5, "dwell_s": 1.0}
    assert (doc["width"], doc["height"], doc["um_per_px"]) == (1280, 960, 1.0)
    stops = doc["stops"]
    assert [s["id"] for s in stops] == list(range(7))
    for s in stops:
        assert set(s) == {"id", "x", "y", "dwell_s", "empty", "truth"} and s["dwell_s"] == 1.0
        assert 0 <= s["x"] <= 1280 - 400 and 0 <= s["y"] <= 960 - 300
    assert len({(s["x"], s["y"]) for s in stops}) == 7
    assert slide.image.shape == (960, 1280, 3)


def test_empty_stops_are_empty_and_the_others_are_not(slide):
    _, planned_empty = stop_positions(P)
    stops = slide.schedule["stops"]
    assert planned_empty == {s["id"] for s in stops if s["empty"]} and len(planned_empty) == round(0.2 * 7)
    for s in stops:
        view = slide.image[s["y"]:s["y"] + 300, s["x"]:s["x"] + 400].astype(np.float32)
        stained = float((view.max(2) - view.min(2) > 40).mean())  # coloured (stained) pixels
        if s["empty"]:
            assert s["truth"]["squamous_count"] == 0 and s["truth"]["objects"] == [] and stained < 0.005
        else:
            assert s["truth"]["squamous_count"] > 3 and stained > 0.02


def test_objects_and_stop_truth(slide):
    assert len(slide.objects) >= 3
    for o in slide.objects:
        x, y, w, h = o["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 1280 and y + h <= 960 and max(w, h) <= 160
    seen = {i for s in slide.schedule["stops"] for i in s["truth"]["objects"]}
    assert seen, "no labelled object under any stop"
    grades = [s["truth"]["fov_grade"] for s in slide.schedule["stops"]]
    assert any(g != "NILM" for g in grades) or any(s["truth"]["organisms"] for s in slide.schedule["stops"])


def test_cache_is_reused_and_keyed_by_parameters(slide):
    d = cached_slide_dir(P)
    stamp = (d / "slide.jpg").stat().st_mtime_ns
    assert cached_slide_dir(P) == d and (d / "slide.jpg").stat().st_mtime_ns == stamp
    assert d.parent == cache_root() and P.key() != SlideParams(**{**P.__dict__, "seed": 2}).key()
    again = load_slide(d)
    assert again.schedule == slide.schedule and np.array_equal(again.image, slide.image)


def test_view_must_fit():
    with pytest.raises(BadInput, match="must fit"):
        SlideParams(width=800, height=600, view_w=1280, view_h=960)


def test_synth_writes_the_slide(tmp_path):
    out = tmp_path / "out"
    rc = main(["synth", str(out), "--images", "1", "--size", "256", "--slide-size", "1280x960", "--stops", "5"])
    assert rc == 0
    sched = json.loads((out / "slide" / "schedule.json").read_text())
    assert len(sched["stops"]) == 5 and sched["camera"]["width"] == 640 and sched["camera"]["height"] == 480
    summary = json.loads((out / "synth.json").read_text())["slide"]
    assert summary["stops"] == 5 and summary["empty_stops"] == [s["id"] for s in sched["stops"] if s["empty"]]
    from cyto_edge.runtime.sources import open_source

    with open_source(f"synth://?path={out / 'slide'}&realtime=0") as src:  # the written camera is the default
        assert (src.w, src.h) == (640, 480) and src.schedule == sched["stops"]
        assert src.read().image.shape == (480, 640, 3)
