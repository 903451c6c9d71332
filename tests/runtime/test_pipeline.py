"""The pipeline: tiles normalized as the manifest says, the decoder's results unchanged by the fast path,
cells cut by tile borders found once, boxes in frame pixels, grading through the pipeline."""
from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest

from cyto_edge.runtime.boxes import iou
from cyto_edge.runtime.decode import PostProcess, postprocess, tile_grid
from cyto_edge.runtime.grading import policy_from_manifest
from cyto_edge.runtime.pipeline import Pipeline, ScaleWarning
from cyto_edge.runtime.tiling import TileBatcher, candidate_indices, cut_tiles, decode_tiles, normalize_batch, pad_value

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_tiles_are_normalized_as_the_manifest_says():
    """Written straight from a BGR frame: identical to cutting RGB tiles and normalizing them."""
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (500, 700, 3), dtype=np.uint8)
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    tiles, grid = cut_tiles(rgb, 320, 64, pad_value(MEAN))
    assert any(t.w < 320 or t.h < 320 for t in grid.tiles) or len(grid.tiles) > 1
    ref = ((tiles.astype(np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(0, 3, 1, 2)
    tb = TileBatcher(320, len(grid.tiles), MEAN, STD, 1 / 255.0, channels=(2, 1, 0))
    got = tb.fill(bgr, grid.tiles)
    assert got.shape == (len(grid.tiles), 3, 320, 320) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-5
    np.testing.assert_array_equal(got, normalize_batch(tiles, MEAN, STD))
    small = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)          # smaller than a tile: padded
    g = tile_grid(100, 150, 320, 64)
    x = TileBatcher(320, 1, MEAN, STD).fill(small, g.tiles)
    pad = (np.array(pad_value(MEAN)) / 255.0 - np.array(MEAN)) / np.array(STD)
    assert np.allclose(x[0, :, 200, 300], pad, atol=1e-5) and np.allclose(x[0, :, 50, 50],
                                                                          (small[50, 50] / 255.0 - MEAN) / STD, atol=1e-5)


@pytest.mark.parametrize("thr,class_thr,bg,spread", [(0.3, None, 2.0, 1.5), (0.05, None, 2.0, 1.5),
                                                     (0.2, [0.9, 0.1, 0.5], 2.0, 1.5), (0.3, None, 0.0, 0.3)])
def test_logit_prefilter_keeps_the_decoders_results(thr, class_thr, bg, spread):
    """Confident background, or (last case) an undecided model with every class alike."""
    rng = np.random.default_rng(1)
    P, C, B = 3000, 3, 4
    pri = np.column_stack([rng.uniform(0.1, 0.9, (P, 2)), rng.uniform(0.05, 0.4, (P, 2))]).astype(np.float32)
    loc = rng.normal(0, 1, (B, P, 4)).astype(np.float32)
    logits = rng.normal(0, spread, (B, P, C + 1)).astype(np.float32)
    logits[..., 0] += bg
    hot = rng.integers(0, P, (B, 40))
    for b in range(B):
        logits[b, hot[b], rng.integers(1, C + 1, 40)] += rng.uniform(1, 8, 40)
    for keep_probs in (False, True):
        cfg = PostProcess(score_threshold=thr, class_thresholds=class_thr, keep_probs=keep_probs)
        fast = decode_tiles((loc, logits), pri, (0.1, 0.1, 0.2, 0.2), 320, cfg)
        for b in range(B):
            ref = postprocess(loc[b], logits[b], pri, (0.1, 0.1, 0.2, 0.2), (320, 320), cfg)
            assert len(ref) > 0
            np.testing.assert_array_equal(fast[b].boxes, ref.boxes)
            np.testing.assert_array_equal(fast[b].scores, ref.scores)
            np.testing.assert_array_equal(fast[b].labels, ref.labels)
            if keep_probs:
                np.testing.assert_array_equal(fast[b].probs, ref.probs)


def test_logit_prefilter_takes_any_layout_and_dtype():
    """Engines hand back float32, float16 or strided views: the candidates are the same priors."""
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1.5, (2, 2000, 6)).astype(np.float32)
    logits[..., 0] += 2.0
    ref = candidate_indices(logits, 0.3)
    assert 0 < sum(len(r) for r in ref) < 4000
    wide = np.zeros((2, 2000, 9), np.float32)
    wide[..., :6] = logits                                        # rows with a stride wider than 6 floats
    for variant in (logits.astype(np.float64), wide[..., :6], np.asfortranarray(logits)):
        for a, b in zip(candidate_indices(variant, 0.3), ref):
            np.testing.assert_array_equal(a, b)
    assert [len(r) for r in candidate_indices(logits, 1.0)] == [2000, 2000]   # no usable threshold: all


def _pipe(tiny, blob_engine, cam=1.0, **kw):
    return Pipeline(tiny, blob_engine(tiny), policy=kw.pop("policy", policy_from_manifest(tiny)),
                    camera_um_per_px=cam, **kw)


def _match(det, boxes, labels):
    """Each drawn cell found exactly once, with its class and box (IoU > 0.9)."""
    assert len(det) == len(boxes), (det.boxes, boxes)
    m = iou(np.asarray(boxes, np.float32), det.boxes)                  # (G, D)
    assert (m.max(1) > 0.9).all(), m
    assert sorted(det.labels[m.argmax(1)].tolist()) == sorted(labels)


def test_a_cell_cut_by_tile_borders_is_found_exactly_once(tiny, blob_engine, draw, real_frame):
    frame = real_frame(900, 700)
    pipe = _pipe(tiny, blob_engine, overlap=160)
    grid = tile_grid(700, 900, 320, 160)
    assert 320 in {t.x0 + t.w for t in grid.tiles} and 320 in {t.y0 + t.h for t in grid.tiles}
    cells = [(290, 100, 350, 150), (40, 300, 90, 345), (300, 300, 352, 350), (600, 500, 660, 560)]
    for k, b in enumerate(cells):                        # across x=320, across y=320, a corner, inside
        draw(frame, b, k + 2)
    det = pipe.detect(frame)
    _match(det, cells, [2, 3, 4, 5])
    assert np.abs(det.boxes[np.argmax(iou(np.array([cells[2]], np.float32), det.boxes)[0])] - cells[2]).max() <= 1.0


@pytest.mark.parametrize("cam", [0.5, 0.31])
def test_frames_are_rescaled_to_the_models_scale_and_boxes_come_back_in_frame_px(tiny, blob_engine, draw, real_frame,
                                                                                  cam):
    frame = real_frame(1400, 1000)
    cells = [(200, 200, 300, 300), (640, 560, 760, 680), (1200, 100, 1300, 190)]
    for b in cells:
        draw(frame, b, 3)
    with pytest.warns(ScaleWarning, match=f"rescaled by {cam:g}"):
        pipe = _pipe(tiny, blob_engine, cam=cam)          # a finer camera than the 1.0 µm/px model
    assert pipe.factor == pytest.approx(cam) and pipe.warnings
    timings = {}
    det = pipe.detect(frame, timings=timings)
    _match(det, cells, [3, 3, 3])
    assert {"rescale", "tile", "preprocess", "infer", "decode", "merge"} <= set(timings)


def _grade(pipe, draw, real_frame, cells):
    frame = real_frame(800, 600)
    for b, k in cells:
        draw(frame, b, k)
    return pipe.grade(frame, fov_id="f1")


def test_grading_through_the_pipeline(tiny, blob_engine, draw, real_frame):
    pipe = _pipe(tiny, blob_engine)
    # classes: ascus 0, asch 1, lsil 2, hsil 3, scc 4, agc 5, trichomonas 6 ...
    r = _grade(pipe, draw, real_frame, [((100, 100, 150, 150), 3), ((400, 100, 450, 150), 0),
                                        ((600, 400, 650, 450), 0)])
    assert r.grade.grade == "HSIL" and r.grade.category_counts["ASC-US"] == 2 and r.grade.suspicion > 0.9
    assert r.fov_id == "f1" and r.frame_shape == (600, 800, 3)
    assert r.bundle_sha == hashlib.sha256((tiny.path / "manifest.json").read_bytes()).hexdigest()
    assert {"infer", "decode", "merge", "quality", "count", "grade", "total"} <= set(r.timings)
    assert isinstance(r.squamous_count, int) and r.quality["focus"] > 0 and r.learned_grade is None
    d = r.to_dict(tiny.classes)
    assert d["grade"] == "HSIL" and d["top_detections"][0]["cls"] in ("hsil", "ascus") and d["class_counts"]["ascus"] == 2

    r = _grade(pipe, draw, real_frame, [((100, 100, 150, 150), 6)])          # an organism only
    assert r.grade.grade == "NILM" and r.grade.organisms == {"trichomonas": 1} and r.grade.suspicion == 0

    r = _grade(pipe, draw, real_frame, [])                                   # nothing found
    assert r.grade.grade == "NILM" and len(r.detections) == 0

    strict = _pipe(tiny, blob_engine, policy=policy_from_manifest(tiny, {"category_min_count": {"HSIL": 2}}))
    r = _grade(strict, draw, real_frame, [((100, 100, 150, 150), 3), ((400, 100, 450, 150), 2)])
    assert r.grade.grade == "LSIL"                                           # one HSIL cell is not enough
    high = _pipe(tiny, blob_engine, policy=policy_from_manifest(tiny, {"class_thresholds": {"hsil": 0.99999}}))
    r = _grade(high, draw, real_frame, [((100, 100, 150, 150), 3)])
    assert r.grade.grade == "NILM" and len(r.detections) == 1               # found, below its threshold


def test_preview_fits_the_field_into_one_input_and_returns_frame_px(tiny, blob_engine, draw, real_frame):
    frame = real_frame(1280, 960)
    cells = [(200, 200, 400, 400), (800, 500, 1000, 720)]
    for b in cells:
        draw(frame, b, 4)
    pipe = _pipe(tiny, blob_engine)
    pr = pipe.preview(frame)
    assert pr.scale == pytest.approx(0.75) and pr.image.shape == (720, 960, 3)
    assert len(pr.detections) == 2 and (iou(np.asarray(cells, np.float32), pr.detections.boxes).max(1) > 0.85).all()
    assert {"downscale", "preprocess", "infer", "decode", "total"} <= set(pr.timings)
    small = real_frame(200, 150)                                             # smaller than the preview side
    assert pipe.preview(small).scale == 1.0


def test_profile_overlap_wins_and_a_bad_overlap_is_refused(tiny, blob_engine):
    assert _pipe(tiny, blob_engine).overlap == tiny.manifest.postprocess.tile.overlap
    assert _pipe(tiny, blob_engine, overlap=64).overlap == 64
    from cyto_edge.errors import BadInput

    with pytest.raises(BadInput, match="overlap 320"):
        _pipe(tiny, blob_engine, overlap=320)


def test_bgr_frames_reach_an_rgb_model_as_rgb(tiny, blob_engine, draw, real_frame):
    """A blue-only cell (B=60, R=G=0) is class 3 only if the pipeline swaps BGR to the model's RGB."""
    frame = real_frame(640, 480)
    draw(frame, (100, 100, 160, 160), 3)
    det = _pipe(tiny, blob_engine).detect(cv2.cvtColor(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), cv2.COLOR_RGB2BGR))
    assert det.labels.tolist() == [3]


@pytest.mark.parametrize("factor", [0.31, 0.5, 0.7, 1.6])
def test_rescale_is_area_averaging_within_a_pixel(real_frame, factor):
    from cyto_edge.runtime.tiling import rescale

    img = real_frame(2028, 1520)
    out = rescale(img, factor)
    assert out.shape == (round(1520 * factor), round(2028 * factor), 3)
    ref = cv2.resize(img, (out.shape[1], out.shape[0]), interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    assert np.abs(out.astype(int) - ref).mean() < 4.0
    assert rescale(img, 1.0) is img


def test_overlapped_tiling_gives_the_serial_path_s_detections_and_raises_engine_errors(tiny, blob_engine, draw,
                                                                                        real_frame):
    frame = real_frame(1400, 1000)                       # 20 tiles of 320 at overlap 64: 10 batches of 2
    cells = [(100 + 120 * k, 80 + 85 * k, 160 + 120 * k, 140 + 85 * k) for k in range(10)]
    for k, b in enumerate(cells):
        draw(frame, b, 2 + k % 4)
    serial = _pipe(tiny, blob_engine, batch_size=2, overlap_tiles=False)
    fast = _pipe(tiny, blob_engine, batch_size=2)
    a, t = serial.detect(frame), {}
    b = fast.detect(frame, timings=t)
    assert fast._workers and not serial._workers     # the helper thread was used, by one pipeline only
    assert len(a) == len(cells) and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
    assert np.array_equal(a.labels, b.labels) and {"preprocess", "infer", "decode", "merge"} <= set(t)
    failing = Pipeline(tiny, blob_engine(tiny, fail_after=3), policy=policy_from_manifest(tiny),
                       camera_um_per_px=1.0, batch_size=2)   # the engine fails on its 4th batch
    with pytest.raises(RuntimeError, match="device lost"):
        failing.detect(frame)
    again = fast.detect(frame)                          # the same pipeline, next frame: unchanged
    assert np.array_equal(a.boxes, again.boxes)
    fast.close()
    assert fast._workers[0]._pool is None
