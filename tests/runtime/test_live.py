"""LiveRunner: FOVs graded once per stop of synth://'s stage (checked against its schedule), in a worker
thread that never drops a recording's FOV and counts a live source's; errors reported, the loop carries on."""
from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from cyto_edge.runtime.fov import FovConfig, FovTracker
from cyto_edge.runtime.grading import policy_from_manifest
from cyto_edge.runtime.live import LiveRunner
from cyto_edge.runtime.pipeline import Pipeline
from cyto_edge.runtime.sources import open_source

SYNTH = "synth://?seed=0&width=640&height=480&stops=8&fps=12&slide_width=2048&slide_height=1536"


def _pipe(bundle, engine):
    return Pipeline(bundle, engine, policy=policy_from_manifest(bundle), camera_um_per_px=1.0)


def test_each_non_empty_stop_is_graded_once_through_the_runner(tiny, blob_engine):
    fovs, previews, states = [], [], []
    with open_source(SYNTH + "&realtime=0") as src:
        runner = LiveRunner(src, _pipe(tiny, blob_engine(tiny)), FovTracker(),
                            on_fov=lambda e, r: fovs.append((e, r)), on_state=lambda s, i: states.append(s),
                            on_preview=lambda f, r, o: previews.append(o.shape))
        stats = runner.run()
        schedule = src.schedule
    assert not runner.live
    stops = [e.frame.meta["stop_id"] for e, _ in fovs]
    non_empty = {s["id"] for s in schedule if not s["empty"]}
    assert 0 < len(non_empty) < len(schedule)
    assert None not in stops and len(stops) == len(set(stops))               # zero duplicates, none while moving
    assert set(stops) == non_empty                                           # zero missed, zero empty
    assert all(e.frame.meta["sharp"] for e, _ in fovs)
    assert [r.fov_id for _, r in fovs] == list(range(len(fovs)))
    assert stats["fovs"] == {"submitted": len(fovs), "graded": len(fovs), "dropped": 0, "dropped_ids": [],
                             "engine_errors": 0, "callback_errors": 0}
    assert stats["frames"] == stats["previews"] == len(previews) > 0 and set(previews) == {(480, 640, 3)}
    assert stats["latency_ms"]["p95"] > 0 and stats["still_to_stored_ms"]["p50"] > 0
    assert {"downscale", "infer", "decode", "overlay", "track"} <= set(stats["preview_ms"])
    assert {"infer", "count", "total"} <= set(stats["grade_ms"]) and states[-1] == "ended"


def test_a_still_field_being_graded_is_previewed_without_the_model_then_with_its_graded_detections(tiny,
                                                                                                   blob_engine):
    previews, graded = [], {}

    def on_fov(e, r):
        graded[e.stop] = r.detections

    with open_source(SYNTH + "&realtime=0") as src:
        runner = LiveRunner(src, _pipe(tiny, blob_engine(tiny)), FovTracker(), on_fov=on_fov,
                            on_preview=lambda f, r, o: (previews.append(({**f.meta, "state": runner.tracker.state},
                                                                         runner.tracker.stop, r)),
                                                        time.sleep(0.005)))          # a display's pace
        stats = runner.run()
    held = [(meta, stop, r) for meta, stop, r in previews if "infer" not in r.timings]
    assert stats["previews_held"] == len(held) > 0 and len(held) < len(previews)
    first = {}                                  # where the view was at each stop's first held frame
    for meta, stop, _ in held:
        x0, y0 = first.setdefault(stop, (meta["stage_x"], meta["stage_y"]))
        assert np.hypot(meta["stage_x"] - x0, meta["stage_y"] - y0) <= runner.hold_drift_px + 1.0, meta
    assert {meta["state"] for meta, _, _ in held} == {"still"}              # motion runs the model again
    shown = [stop for _, stop, r in held if stop in graded and r.detections is graded[stop]]
    assert shown                                                             # the stored detections, drawn
    with open_source(SYNTH + "&realtime=0") as src:
        off = LiveRunner(src, _pipe(tiny, blob_engine(tiny)), FovTracker(), hold_still=False).run()
    assert off["previews_held"] == 0 and off["fovs"]["graded"] == stats["fovs"]["graded"]


def _folder(tmp_path, real_frame, n):
    d = tmp_path / "fields"
    d.mkdir()
    for i in range(n):
        cv2.imwrite(str(d / f"f{i:02d}.png"), np.roll(real_frame(320, 240), 17 * i, axis=1))
    return f"folder://{d}"


def test_a_recording_never_drops_a_fov_even_when_grading_is_slow(tiny, blob_engine, tmp_path, real_frame):
    uri = _folder(tmp_path, real_frame, 6)
    got = []

    def slow_store(event, result):
        time.sleep(0.15)
        got.append(result.fov_id)

    with open_source(uri) as src:
        stats = LiveRunner(src, _pipe(tiny, blob_engine(tiny)), FovTracker(), on_fov=slow_store,
                           grade_every_frame=True, fov_queue=1).run()
    assert got == list(range(6)) and stats["fovs"]["dropped"] == 0 and stats["frames"] == 6


def test_a_live_source_keeps_the_newest_fov_and_counts_the_dropped(tiny, blob_engine, tmp_path, real_frame):
    uri = _folder(tmp_path, real_frame, 8) + "?fps=20"                          # a frame every 50 ms
    got = []
    with open_source(uri) as src:
        runner = LiveRunner(src, _pipe(tiny, blob_engine(tiny)), FovTracker(), grade_every_frame=True,
                            on_fov=lambda e, r: (time.sleep(0.3), got.append(r.fov_id)), fov_queue=1,
                            latest_only=True)
        stats = runner.run()
    f = stats["fovs"]
    assert runner.live and f["submitted"] == stats["frames"]
    assert f["dropped"] > 0 and f["graded"] + f["dropped"] == f["submitted"]     # every FOV accounted for
    assert set(got).isdisjoint(f["dropped_ids"]) and got == sorted(got)
    assert got[-1] == f["submitted"] - 1                                          # the newest one was graded


def test_engine_errors_are_reported_and_the_loop_carries_on(tiny, blob_engine, tmp_path, real_frame):
    uri = _folder(tmp_path, real_frame, 4)
    states = []
    eng = blob_engine(tiny, fail_after=3)                                         # the device dies mid-run
    with open_source(uri) as src:
        stats = LiveRunner(src, _pipe(tiny, eng), FovTracker(), grade_every_frame=True,
                           on_state=lambda s, i: states.append((s, i.get("where")))).run()
    assert stats["frames"] == 4 and stats["fovs"]["engine_errors"] > 0 and "device lost" in stats["last_error"]
    assert ("engine_error", "preview") in states or ("engine_error", "grade") in states
    assert stats["fovs"]["graded"] + stats["fovs"]["engine_errors"] >= 4


def test_a_failing_callback_does_not_stop_the_run(tiny, blob_engine, tmp_path, real_frame):
    uri = _folder(tmp_path, real_frame, 3)

    def boom(*a):
        raise ValueError("disk full")

    with open_source(uri) as src:
        stats = LiveRunner(src, _pipe(tiny, blob_engine(tiny)), FovTracker(), grade_every_frame=True,
                           on_fov=boom, on_preview=boom).run()
    assert stats["frames"] == 3 and stats["fovs"]["graded"] == 3 and stats["fovs"]["callback_errors"] == 6


def test_stop_event_and_max_frames_end_a_live_run(tiny, blob_engine):
    stop = threading.Event()
    seen = []

    def on_preview(frame, result, overlay):
        seen.append(frame.index)
        if len(seen) == 5:
            stop.set()

    with open_source(SYNTH + "&realtime=1&loop=1") as src:
        runner = LiveRunner(src, _pipe(tiny, blob_engine(tiny)), FovTracker(FovConfig()), on_preview=on_preview)
        stats = runner.run(stop_event=stop)
        assert runner.live and stats["frames"] == 5 and seen == sorted(seen)
        stats = LiveRunner(src, _pipe(tiny, blob_engine(tiny)), FovTracker()).run(max_frames=3)
    assert stats["frames"] == 3 and "capture" in stats


@pytest.mark.slow
def test_stage_still_in_real_time_through_the_latest_frame_reader(tiny, blob_engine):
    """The same schedule check with the camera pacing itself (frames the loop misses are dropped)."""
    fovs = []
    with open_source(SYNTH + "&realtime=1") as src:
        runner = LiveRunner(src, _pipe(tiny, blob_engine(tiny)), FovTracker(), on_fov=lambda e, r: fovs.append(e))
        stats = runner.run()
        schedule = src.schedule
    stops = [e.frame.meta["stop_id"] for e in fovs]
    assert runner.live and None not in stops and len(stops) == len(set(stops))
    assert set(stops) == {s["id"] for s in schedule if not s["empty"]}
    assert stats["fovs"]["dropped"] == 0 and stats["latency_ms"]["p95"] is not None


def test_a_recording_that_ends_on_a_still_field_grades_that_field(tiny, blob_engine):
    """seed=1: the last stop is less sharp than the recent fields and the stream ends before the tracker's
    max wait (and before its plateau wait, made long here); the runner flushes the tracker, so the field is
    graded once, not lost."""
    events = []
    uri = "synth://?seed=1&width=640&height=480&stops=6&fps=12&slide_width=2048&slide_height=1536&realtime=0"
    with open_source(uri) as src:
        LiveRunner(src, _pipe(tiny, blob_engine(tiny)), FovTracker(FovConfig(plateau_frames=1000)),
                   on_fov=lambda e, r: events.append(e)).run()
        last = max(s["id"] for s in src.schedule if not s["empty"])
    assert events[-1].frame.meta["stop_id"] == last and events[-1].reason == "end"
    assert [e.reason for e in events[:-1]].count("end") == 0
    tr = FovTracker()
    assert tr.flush() is None                                        # nothing seen: nothing to flush


def test_the_grading_worker_yields_the_cpu_to_the_preview(tiny, blob_engine, tmp_path, real_frame):
    import os

    if not hasattr(os, "setpriority"):
        pytest.skip("per-thread priority is a Linux feature")
    uri = _folder(tmp_path, real_frame, 2)
    seen = []
    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with open_source(uri) as src:
        LiveRunner(src, _pipe(tiny, blob_engine(tiny)), FovTracker(), grade_every_frame=True, grade_nice=4,
                   on_fov=lambda e, r: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))).run()
    assert seen == [min(19, main_nice + 4)] * 2
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice     # the loop's is unchanged


def test_runner_statistics_keep_the_last_window_of_samples_and_their_quantiles():
    from cyto_edge.runtime.live import WINDOW, _Stats

    rng = np.random.default_rng(0)
    st, seen = _Stats(), []
    for v in rng.exponential(10.0, WINDOW + 737):        # wraps around the ring
        st.add_timings("grade", {"infer": v, "total": 2 * v})
        seen.append(v)
    last = np.asarray(seen[-WINDOW:])
    np.testing.assert_array_equal(st.values("grade.infer"), last)
    s = st.summary("grade")
    assert sorted(s) == ["infer", "total"]
    assert s["infer"] == {"p50": round(float(np.percentile(last, 50)), 3), "p95": round(float(np.percentile(last, 95)), 3)}
    assert s["total"]["p95"] == pytest.approx(2 * s["infer"]["p95"], abs=2e-3)
    assert st.values("never").size == 0 and st.summary("preview") == {}
