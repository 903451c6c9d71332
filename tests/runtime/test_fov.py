"""FovTracker on stage sequences generated here: a textured slide panned with cv2.warpAffine, with pauses,
focus ramps, an empty area. Each non-empty pause is captured exactly once, sharp; empty and never-focused
pauses are skipped; motion is required between two captures."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cyto_edge.runtime.fov import FovConfig, FovTracker
from cyto_edge.runtime.sources import Frame

VIEW = (320, 240)                       # camera frame (W, H)
EMPTY_X = (1270, 1510)                  # view positions (left edge) that see only background


def make_slide(w: int = 2600, h: int = 700, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 BGR: stained cells with nuclei on a bright background, no cells in x 1240..1860."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float32)
    img[:] = (232, 228, 236)
    for _ in range(w * h // 2500):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        if 1240 < x < 1860:
            continue
        axes = tuple(int(a) for a in rng.uniform(12, 30, 2))
        pink = (rng.uniform(150, 220), rng.uniform(110, 180), rng.uniform(170, 230))
        blue = (rng.uniform(180, 230), rng.uniform(150, 190), rng.uniform(110, 160))
        cv2.ellipse(img, (int(x), int(y)), axes, rng.uniform(0, 180), 0, 360, pink if rng.random() < .6 else blue,
                    -1, cv2.LINE_AA)
        cv2.circle(img, (int(x + rng.uniform(-3, 3)), int(y + rng.uniform(-3, 3))), int(rng.uniform(3, 7)),
                   (110, 60, 90), -1, cv2.LINE_AA)
    img += cv2.GaussianBlur(rng.normal(0, 6, (h, w, 1)).astype(np.float32), (0, 0), 1.0)[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def slide() -> np.ndarray:
    return make_slide()


def frames(slide: np.ndarray, plan: list, x0: float = 10.0, y0: float = 200.0, noise: float = 2.0):
    """plan: ("move", n, (vx, vy)) or ("pause", n, sigma | [sigma per frame]). Frames carry their truth in meta:
    pause number (None while moving), blur sigma, view position."""
    rng = np.random.default_rng(1)
    x, y, pause, i = x0, y0, 0, 0
    for kind, n, arg in plan:
        pause += kind == "pause"
        for k in range(n):
            sigma = 0.0
            if kind == "move":
                x, y = x + arg[0], y + arg[1]
            else:
                sigma = float(arg[k] if isinstance(arg, (list, tuple)) else arg)
            f = cv2.warpAffine(slide, np.float32([[1, 0, -x], [0, 1, -y]]), VIEW, borderMode=cv2.BORDER_REFLECT)
            if kind == "move" and abs(arg[0]) >= 3:     # motion blur along the pan
                f = cv2.blur(f, (int(abs(arg[0])) // 2 * 2 + 1, 1))
            if sigma > 0:
                f = cv2.GaussianBlur(f, (0, 0), sigma)
            f = np.clip(f + rng.normal(0, noise, f.shape), 0, 255).astype(np.uint8)
            yield Frame(f, i, i / 30.0, meta={"pause": pause if kind == "pause" else None, "sigma": sigma,
                                             "x": x, "y": y})
            i += 1


def run(plan, slide, cfg=None, **kw):
    tr = FovTracker(cfg)
    events = [e for e in (tr.update(f) for f in frames(slide, plan, **kw)) if e is not None]
    return tr, events


RAMP_IN = [3.0, 2.5, 2.0, 1.5, 1.0, 0.6, 0.3] + [0.0] * 10      # focus comes in
DIP = [0, 0, 0, 1, 2, 3, 2, 1, 0.5] + [0.0] * 11                 # focus drifts away and back
RISING = [2.0, 1.6, 1.3, 1.0, 0.7, 0.4, 0.2, 0.0]                # still improving when the stage leaves


def test_each_non_empty_pause_is_captured_once_and_sharp(slide):
    plan = [("pause", 12, 0.0), ("move", 25, (10, 0)),            # pause 1 at x=10
            ("pause", 17, RAMP_IN), ("move", 20, (12, 0)),        # pause 2 at x=260: focus ramps in
            ("pause", 20, DIP), ("move", 85, (10, 0)),            # pause 3 at x=500: focus dips
            ("pause", 15, 0.0), ("move", 55, (10, 0)),            # pause 4 at x=1350: empty background
            ("pause", len(RISING), RISING), ("move", 15, (10, 0)),  # pause 5 at x=1900: leaves while focusing
            ("pause", 30, 0.0)]                                   # pause 6 at x=2050: sparse, waits
    tr, events = run(plan, slide)
    pauses = [e.frame.meta["pause"] for e in events]
    assert pauses == [1, 2, 3, 5, 6], [(e.frame.meta, e.reason) for e in events]
    assert all(e.frame.meta["sigma"] <= 0.3 for e in events), [e.frame.meta for e in events]
    assert tr.skipped_empty == 1 and tr.captured == 5
    assert {e.reason for e in events} >= {"peak", "departure"}
    assert all(e.quality.tissue > 0.1 and not e.quality.empty for e in events)


def test_a_field_less_sharp_than_the_recent_ones_is_taken_once_its_focus_stops_changing(slide):
    """Fields differ in sharpness: one whose focus has stopped improving is taken after plateau_frames,
    not held until max_wait_frames (which still applies with a longer plateau)."""
    plan = [("pause", 12, 0.0), ("move", 25, (10, 0)), ("pause", 40, 0.5)]   # the second field half as sharp
    tr, events = run(plan, slide)
    assert [e.frame.meta["pause"] for e in events] == [1, 2]
    first, second = events
    assert second.relative_focus > 0.95 and tr.history.relative(second.quality.focus_norm) < 0.6
    cfg = FovConfig()
    assert second.reason == "peak" and first.waited_frames < second.waited_frames < cfg.max_wait_frames
    tr, events = run(plan, slide, FovConfig(plateau_frames=100))
    assert events[1].reason == "timeout" and events[1].waited_frames == cfg.max_wait_frames


def test_focus_dip_takes_the_sharp_frame_not_the_blurred_current_one(slide):
    tr, events = run([("move", 10, (10, 0)), ("pause", 20, DIP)], slide)
    assert len(events) == 1
    assert events[0].frame.meta["sigma"] == 0.0
    assert events[0].relative_focus > 0.9


def test_a_pause_that_never_comes_into_focus_is_skipped(slide):
    plan = [("pause", 10, 0.0), ("move", 20, (10, 0)), ("pause", 60, 4.0), ("move", 20, (10, 0)),
            ("pause", 10, 0.0)]
    tr, events = run(plan, slide)
    assert [e.frame.meta["pause"] for e in events] == [1, 3]
    assert tr.skipped_blurred == 1


def test_a_long_pause_gives_one_fov_and_motion_is_needed_for_the_next(slide):
    tr, events = run([("pause", 150, 0.0)], slide)
    assert len(events) == 1 and tr.state == "still"
    # jitter below the still threshold is not motion: still one FOV
    tr2, events2 = run([("pause", 10, 0.0), ("move", 20, (0.3, 0.0)), ("pause", 20, 0.0)], slide)
    assert len(events2) == 1


def test_slow_drift_makes_new_fields_without_duplicates(slide):
    """Creeping at 1 px/frame never looks like motion; drifting a quarter frame counts as a new field."""
    tr, events = run([("move", 240, (1.0, 0.0))], slide)
    xs = [e.frame.meta["x"] for e in events]
    assert 3 <= len(events) <= 5, xs
    assert np.all(np.diff(xs) >= 0.25 * VIEW[1] - 2), xs


def test_timeout_takes_the_best_frame_when_focus_keeps_wobbling(slide):
    wobble = [0.0 if k % 2 == 0 else 1.5 for k in range(60)]        # never settles for settle_frames
    cfg = FovConfig(settle_frames=100, max_wait_frames=20)
    tr, events = run([("pause", 60, wobble)], slide, cfg)
    assert len(events) == 1 and events[0].reason == "timeout"
    assert events[0].frame.meta["sigma"] == 0.0


def test_fast_jumps_count_as_motion(slide):
    """A jump larger than the correlation window (weak peak) is still motion (grey difference)."""
    plan = [("pause", 10, 0.0), ("move", 1, (400, 0)), ("pause", 10, 0.0), ("move", 1, (-300, 60)),
            ("pause", 10, 0.0)]
    tr, events = run(plan, slide)
    assert [e.frame.meta["pause"] for e in events] == [1, 2, 3]


def test_profile_pipeline_section_configures_the_tracker():
    from cyto_edge.runtime.profile import PipelineSettings

    cfg = PipelineSettings(still_frames=5, focus_relative=0.7, empty_threshold=0.05).fov_config()
    assert (cfg.still_frames, cfg.focus_relative, cfg.empty_threshold) == (5, 0.7, 0.05)
    assert cfg.quality.empty_threshold == 0.05


def test_synthetic_stage_every_non_empty_stop_once():
    """synth:// knows its stop schedule: no duplicate and no missed field; nothing moving, empty or blurred."""
    pytest.importorskip("cyto_edge.runtime.sources.synthetic")
    from cyto_edge.runtime.sources import open_source

    uri = "synth://?seed=0&realtime=0&width=640&height=480&stops=10&slide_width=2048&slide_height=1536"
    with open_source(uri) as src:
        tr = FovTracker()
        events = [e for e in (tr.update(f) for f in iter(src.read, None)) if e is not None]
        schedule = src.schedule
    non_empty = {s["id"] for s in schedule if not s["empty"]}
    assert 0 < len(non_empty) < len(schedule)                       # the run crosses empty stops too
    stops = [e.frame.meta["stop_id"] for e in events]
    assert None not in stops                                        # never a frame taken while moving
    assert len(stops) == len(set(stops))                            # zero duplicates
    assert set(stops) == non_empty                                  # zero missed, zero empty
    assert all(e.frame.meta["sharp"] and not e.frame.meta["empty"] for e in events)
    assert tr.captured == len(non_empty) and tr.skipped_blurred == 0


def test_a_change_of_frame_size_starts_a_new_field(slide):
    tr = FovTracker()
    events = [tr.update(f) for f in frames(slide, [("pause", 12, 0.0)])]
    assert sum(e is not None for e in events) == 1
    bigger = Frame(np.ascontiguousarray(slide[100:580, 10:650]), 99, 0.0, {})   # (480, 640, 3), same scale
    assert tr.update(bigger) is None and tr.state == "moving"
    later = [tr.update(Frame(bigger.image.copy(), 100 + k, 0.0, {})) for k in range(30)]
    assert sum(e is not None for e in later) == 1
