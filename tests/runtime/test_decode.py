"""The numpy decoder agrees with torchvision's BoxCoder and batched_nms; tiles merge into frame pixels."""
import numpy as np
import pytest

from cyto_edge.runtime import boxes as B
from cyto_edge.runtime.decode import (Detections, PostProcess, decode_boxes, encode_boxes, merge_tiles,
                                      postprocess, tile_grid)
from cyto_edge.runtime.priors import PriorSpec, make_priors

torch = pytest.importorskip("torch")
tv_ops = pytest.importorskip("torchvision.ops")
from torchvision.models.detection._utils import BoxCoder  # noqa: E402


def _priors():
    return make_priors(PriorSpec(input_size=(320, 320), feature_sizes=[(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]))


def test_decode_matches_torchvision_boxcoder():
    rng = np.random.default_rng(0)
    pri = _priors()
    loc = rng.normal(0, 2, size=pri.shape).astype(np.float32)
    loc[:5, 2:] = 40.0  # exercises the exp() clamp
    ours = decode_boxes(loc, pri, (0.1, 0.1, 0.2, 0.2), (320, 320))
    pri_xyxy = torch.from_numpy(B.cxcywh_to_xyxy(pri) * 320)
    ref = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).decode_single(torch.from_numpy(loc), pri_xyxy).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


def test_encode_inverts_decode():
    rng = np.random.default_rng(1)
    pri = _priors()
    loc = rng.normal(0, 1, size=pri.shape).astype(np.float32)
    boxes = decode_boxes(loc, pri, size=(320, 320))
    np.testing.assert_allclose(encode_boxes(boxes, pri, size=(320, 320)), loc, atol=2e-3)


@pytest.mark.parametrize("impl", ["opencv", "numpy"])
@pytest.mark.parametrize("seed", range(5))
def test_batched_nms_matches_torchvision(seed, impl, monkeypatch):
    """OpenCV's NMS where it has NMSBoxesBatched, the numpy one where it does not: both equal torchvision's,
    order included, with ties in score (seeds 3 and 4 round the scores to one decimal)."""
    if impl == "numpy":
        monkeypatch.setattr(B, "_CV_NMS", None)
    else:
        assert B._CV_NMS is not None, "this OpenCV has no cv2.dnn.NMSBoxesBatched"
    rng = np.random.default_rng(seed)
    n = 300
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(5, 60, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    if seed >= 3:
        scores = np.round(scores, 1).astype(np.float32)
    classes = rng.integers(0, 4, n)
    ours = B.batched_nms(boxes, scores, classes, 0.45)
    ref = tv_ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), 0.45).numpy()
    assert sorted(ours.tolist()) == sorted(ref.tolist())
    np.testing.assert_array_equal(ours, ref)  # same order too: decreasing score


def test_postprocess_matches_torchvision_pipeline():
    """decode -> softmax -> per-class threshold -> batched_nms, done with torchvision ops, equals ours."""
    rng = np.random.default_rng(3)
    pri = _priors()
    P, C = len(pri), 5
    loc = rng.normal(0, 1, (P, 4)).astype(np.float32)
    logits = rng.normal(0, 2, (P, C + 1)).astype(np.float32)
    cfg = PostProcess(score_threshold=0.3, nms_iou=0.5, max_detections=10_000, pre_nms_topk=10_000)
    det = postprocess(loc, logits, pri, (0.1, 0.1, 0.2, 0.2), (320, 320), cfg)

    tb = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).decode_single(
        torch.from_numpy(loc), torch.from_numpy(B.cxcywh_to_xyxy(pri) * 320))
    tb = tb.clamp(0, 320)
    probs = torch.softmax(torch.from_numpy(logits), -1)[:, 1:]
    pi, ci = torch.nonzero(probs >= 0.3, as_tuple=True)
    bx, sc = tb[pi], probs[pi, ci]
    ok = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
    bx, sc, ci = bx[ok], sc[ok], ci[ok]
    keep = tv_ops.batched_nms(bx, sc, ci, 0.5)
    assert len(det) == len(keep) > 0
    np.testing.assert_allclose(det.boxes, bx[keep].numpy(), atol=1e-3)
    np.testing.assert_allclose(det.scores, sc[keep].numpy(), atol=1e-6)
    np.testing.assert_array_equal(det.labels, ci[keep].numpy())


def test_class_thresholds_apply_per_class():
    pri = _priors()
    P = len(pri)
    logits = np.full((P, 3), -10.0, np.float32)
    logits[0, 1] = 5.0   # class 0, p ~ 1
    logits[1, 2] = 0.0   # class 1, p ~ 0.5
    logits[1, 0] = 0.0
    loc = np.zeros((P, 4), np.float32)
    det = postprocess(loc, logits, pri, (0.1, 0.1, 0.2, 0.2), (320, 320), PostProcess(class_thresholds=[0.9, 0.6]))
    assert det.labels.tolist() == [0]
    det = postprocess(loc, logits, pri, (0.1, 0.1, 0.2, 0.2), (320, 320), PostProcess(class_thresholds=[0.9, 0.4]))
    assert sorted(det.labels.tolist()) == [0, 1]


def test_tile_grid_covers_frame_with_overlap():
    g = tile_grid(1520, 2028, 320, 128)
    xs = sorted({t.x0 for t in g.tiles})
    ys = sorted({t.y0 for t in g.tiles})
    assert xs[0] == 0 and xs[-1] + 320 == 2028 and ys[-1] + 320 == 1520
    assert min(np.diff(xs)) >= 1 and max(np.diff(xs)) <= 320 - 128
    small = tile_grid(200, 250, 320, 128)
    assert [(t.x0, t.y0, t.w, t.h) for t in small.tiles] == [(0, 0, 250, 200)]


def test_cell_cut_by_tile_border_is_found_once():
    """An object straddling the border of two tiles: the cut box is dropped, the whole one kept."""
    g = tile_grid(320, 500, 320, 140)   # tiles at x0 = 0 and x0 = 180
    obj = np.array([250, 100, 330, 170], np.float32)  # frame coordinates, crosses x = 320
    per_tile = []
    for t in g.tiles:
        b = obj.copy()
        b[0::2] -= t.x0
        b[1::2] -= t.y0
        b[0::2] = np.clip(b[0::2], 0, t.w)
        per_tile.append(Detections(b[None], np.array([0.9], np.float32), np.array([2])))
    merged = merge_tiles(per_tile, g)
    assert len(merged) == 1
    np.testing.assert_allclose(merged.boxes[0], obj)


@pytest.mark.parametrize("nms", [B.nms, B._nms_numpy])
def test_nms_large_input_agrees(nms):
    """2500 boxes: OpenCV's NMS, and the numpy one's per-box loop (above 2000 boxes), equal torchvision's."""
    rng = np.random.default_rng(7)
    n = 2500
    xy = rng.uniform(0, 1000, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (n, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    ours = nms(boxes, scores, 0.5)
    ref = tv_ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    np.testing.assert_array_equal(ours, ref)
