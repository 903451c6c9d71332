"""Per-class threshold calibration on score distributions whose answer is known."""
import json

import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.runtime.bundle import InputSpec, Manifest, OutputSpec
from cyto_edge.runtime.calibration import CalibrationWarning, apply_thresholds, calibrate_thresholds


def _grid(n: int, size: float = 20.0, step: float = 30.0, y0: float = 0.0) -> np.ndarray:
    """(n, 4) xyxy boxes on a row-major grid, 10 per row, non-overlapping."""
    i = np.arange(n)
    x, y = (i % 10) * step, y0 + (i // 10) * step
    return np.stack([x, y, x + size, y + size], 1).astype(np.float64)


def _case(tp_scores, fp_scores, n_gt, label=0, n_images=4, rng=None):
    """GT boxes of one class spread over images; the first len(tp_scores) GT found exactly, plus FPs."""
    rng = rng or np.random.default_rng(0)
    boxes = _grid(n_gt)
    img = rng.integers(0, n_images, n_gt)
    fp_img = rng.integers(0, n_images, len(fp_scores))
    gt, preds = [], []
    for i in range(n_images):
        sel = np.flatnonzero(img == i)
        found = sel[sel < len(tp_scores)]
        fps = np.flatnonzero(fp_img == i)
        b = np.r_[boxes[found], _grid(len(fps), y0=2000.0)].reshape(-1, 4)
        s = np.r_[np.asarray(tp_scores, float)[found], np.asarray(fp_scores, float)[fps]]
        gt.append({"boxes": boxes[sel], "labels": np.full(len(sel), label)})
        preds.append({"boxes": b, "scores": s, "labels": np.full(len(s), label)})
    return gt, preds


def test_highest_threshold_meeting_the_target():
    rng = np.random.default_rng(1)
    tp = rng.permutation(np.linspace(0.99, 0.02, 100))          # 100 GT, all found, distinct scores
    fp = rng.uniform(0.0, 0.6, 300)
    gt, preds = _case(tp, fp, 100)
    r = calibrate_thresholds(gt, preds, ["hsil"], target_recall=0.95)["hsil"]
    want = np.sort(tp)[::-1][94]                                 # the 95th best true positive
    assert r["status"] == "calibrated" and r["threshold"] == pytest.approx(want)
    assert r["recall"] == pytest.approx(0.95) and r["n_gt"] == 100
    kept = 95 + int(np.sum(fp >= want))
    assert r["precision"] == pytest.approx(95 / kept)
    r90 = calibrate_thresholds(gt, preds, ["hsil"], target_recall=0.90)["hsil"]
    assert r90["threshold"] == pytest.approx(np.sort(tp)[::-1][89]) and r90["threshold"] > r["threshold"]


def test_ties_at_the_cut():
    # 20 GT; 18 true positives at 0.9, 2 at 0.5; a false positive tied at 0.9
    gt, preds = _case([0.9] * 18 + [0.5] * 2, [0.9], 20, n_images=1)
    r = calibrate_thresholds(gt, preds, ["a"], target_recall=0.9)["a"]
    assert (r["threshold"], r["recall"]) == (0.9, 0.9)
    assert r["precision"] == pytest.approx(18 / 19)              # the tied FP is kept too
    r = calibrate_thresholds(gt, preds, ["a"], target_recall=0.91)["a"]
    assert (r["threshold"], r["recall"], r["precision"]) == (0.5, 1.0, pytest.approx(20 / 21))


def test_iou_criterion():
    gt, preds = _case(np.linspace(0.9, 0.5, 10), [], 10, n_images=1)
    preds[0]["boxes"] = preds[0]["boxes"] + np.array([0, 0, 0, 25.0])   # IoU 20*20 / (20*45) = 0.44
    with pytest.warns(CalibrationWarning, match="no true positives"):
        assert calibrate_thresholds(gt, preds, ["a"], default=0.2)["a"]["threshold"] == 0.2
    r = calibrate_thresholds(gt, preds, ["a"], target_recall=0.8, iou=0.4)["a"]
    assert r["status"] == "calibrated" and r["threshold"] == pytest.approx(np.linspace(0.9, 0.5, 10)[7])


def test_unreachable_target_warns_and_takes_lowest_useful_score():
    tp = np.linspace(0.9, 0.3, 80)                               # 80 of 100 GT ever found
    gt, preds = _case(tp, [0.1, 0.05, 0.2], 100)
    with pytest.warns(CalibrationWarning, match="recall 0.800 < target 0.95"):
        r = calibrate_thresholds(gt, preds, ["a"], target_recall=0.95)["a"]
    assert r["status"] == "unreachable" and r["threshold"] == pytest.approx(0.3) and r["recall"] == 0.8


def test_classes_without_gt_keep_their_default_and_subset():
    gt, preds = _case(np.linspace(0.9, 0.5, 10), [0.7], 10, label=1)
    with pytest.warns(CalibrationWarning, match="ascus: no ground truth"):
        res = calibrate_thresholds(gt, preds, ["ascus", "asch"], default={"ascus": 0.4, "asch": 0.35})
    assert res["asch"]["status"] == "calibrated" and res["ascus"]["threshold"] == 0.4  # only asch has GT
    gt0 = [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0)}]
    pred0 = [{"boxes": _grid(1), "scores": [0.8], "labels": [0]}]
    with pytest.warns(CalibrationWarning, match="no ground truth"):
        res = calibrate_thresholds(gt0, pred0, ["ascus", "asch"], default={"ascus": 0.4, "asch": 0.35},
                                   classes_subset=["ASCUS"])
    assert list(res) == ["ascus"] and res["ascus"]["threshold"] == 0.4 and res["ascus"]["n_gt"] == 0
    with pytest.raises(BadInput, match="'lsil' is not a class"):
        calibrate_thresholds(gt0, pred0, ["ascus", "asch"], classes_subset=["lsil"])
    with pytest.raises(BadInput, match="target-recall"):
        calibrate_thresholds(gt0, pred0, ["ascus", "asch"], target_recall=1.5)


def test_apply_thresholds_writes_the_manifest():
    m = Manifest(classes=["a", "b"], bethesda={"a": "HSIL", "b": "NILM"}, um_per_px=1.0,
                 input=InputSpec(size=(320, 320)), output=OutputSpec(num_priors=10))
    gt, preds = _case(np.linspace(0.9, 0.5, 20), [], 20)
    with pytest.warns(CalibrationWarning):
        res = calibrate_thresholds(gt, preds, m.classes, target_recall=0.5, default=0.3)
    apply_thresholds(m, res, 0.5)
    assert m.postprocess.class_thresholds == {"a": pytest.approx(res["a"]["threshold"])}
    assert m.quality["calibration"]["classes"]["b"]["status"] == "no ground truth"
    json.dumps(m.model_dump(mode="json"))  # the manifest stays serialisable
    m2 = Manifest.model_validate(m.model_dump(mode="json"))
    assert m2.postprocess.to_postprocess(m2.classes).class_thresholds == [pytest.approx(res["a"]["threshold"]), 0.3]
    with pytest.raises(BadInput, match="lacks: z"):
        apply_thresholds(m, {"z": {"status": "calibrated", "threshold": 0.1}})
