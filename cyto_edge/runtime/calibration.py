"""Operating thresholds per class from a validation set: the library side of `cyto-edge calibrate`.

For each class, the highest score threshold whose recall at IoU 0.5 reaches the target (a screening
device should miss few abnormal cells; precision is what it costs). Detections count at a threshold t
when score >= t, as in the decoder. Matching is COCOeval's greedy matching (runtime/metrics.py), without
the 100-per-image cap. Because detections below the bundle's current post-processing thresholds never
reach this code, run the detector with a low score threshold (e.g. 0.01) on the validation set first.

When the target cannot be reached, the threshold is the lowest score that still adds a true positive
(the highest recall the detector can give), with a warning; a class without ground truth, or without any
true positive, keeps its current threshold.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.runtime.metrics import prepare_pairs, group_ends, match_class


class CalibrationWarning(UserWarning):
    """A class whose recall target could not be met (or could not be calibrated at all)."""


def _defaults(default: float | dict, classes: list[str]) -> dict[str, float]:
    if isinstance(default, dict):
        return {c: float(default.get(c, 0.5)) for c in classes}
    return {c: float(default) for c in classes}


def _subset(classes: list[str], subset: Sequence[str] | None) -> list[int]:
    if not subset:
        return list(range(len(classes)))
    low = {c.lower(): i for i, c in enumerate(classes)}
    idx = []
    for name in subset:
        if name.lower() not in low:
            raise BadInput(f"--classes: {name!r} is not a class of this bundle ({', '.join(classes)})")
        idx.append(low[name.lower()])
    return idx


def calibrate_class(scores: np.ndarray, matched: np.ndarray, n_gt: int, target_recall: float) -> dict:
    """One class. scores (D,) descending, matched (D,) bool in that order -> threshold, recall, precision, status."""
    if n_gt == 0:
        return {"status": "no ground truth"}
    tp = np.cumsum(matched)                                   # (D,) true positives kept at each rank
    if len(tp) == 0 or tp[-1] == 0:
        return {"status": "no true positives"}
    ends = group_ends(scores)                                 # operating points: score >= scores[e]
    rec = tp[ends] / n_gt
    ok = np.flatnonzero(rec >= target_recall - 1e-12)
    if len(ok):
        e, status = ends[ok[0]], "calibrated"
    else:
        e = ends[np.searchsorted(ends, np.flatnonzero(matched)[-1])]   # group of the last true positive
        status = "unreachable"
    return {"status": status, "threshold": float(scores[e]), "recall": float(tp[e] / n_gt),
            "precision": float(tp[e] / (e + 1))}


def calibrate_thresholds(gt: Sequence, preds: Sequence, classes: Sequence[str], target_recall: float = 0.95,
                         classes_subset: Sequence[str] | None = None, iou: float = 0.5,
                         default: float | dict = 0.5, include_weak: bool = False) -> dict[str, dict]:
    """Per class: {threshold, recall, precision, n_gt, n_det, status}, for `classes_subset` (default all).

    `default` (one value or {class: value}) is the threshold a class keeps when it cannot be calibrated;
    pass the bundle's current thresholds. `status` is "calibrated", "unreachable" (best recall below the
    target; warned), "no ground truth" or "no true positives" (threshold = default; warned).
    """
    if not 0 < target_recall <= 1:
        raise BadInput(f"--target-recall must be in (0, 1], got {target_recall}")
    if not 0 < iou < 1:
        raise BadInput(f"iou must be in (0, 1), got {iou}")
    classes = list(classes)
    pairs, _ = prepare_pairs(gt, preds, len(classes), include_weak)
    dflt = _defaults(default, classes)
    out: dict[str, dict] = {}
    for k in _subset(classes, classes_subset):
        name = classes[k]
        cm = match_class(pairs, k, np.array([iou]), max_dets=None)
        r = calibrate_class(cm.scores, cm.matched[0], cm.n_gt, target_recall)
        entry: dict[str, Any] = {"threshold": dflt[name], "recall": None, "precision": None, **r,
                                 "n_gt": cm.n_gt, "n_det": int(len(cm.scores))}
        if r["status"] == "unreachable":
            warnings.warn(f"{name}: recall {r['recall']:.3f} < target {target_recall} at IoU {iou}; threshold "
                          f"{r['threshold']:.4f} gives the highest recall reachable", CalibrationWarning, stacklevel=2)
        elif r["status"] != "calibrated":
            warnings.warn(f"{name}: {r['status']} in the validation set; threshold left at {dflt[name]}",
                          CalibrationWarning, stacklevel=2)
        out[name] = entry
    return out


def apply_thresholds(manifest: Any, result: dict[str, dict], target_recall: float | None = None) -> Any:
    """Write calibrated thresholds into a Manifest's postprocess.class_thresholds (in place); returns it.

    Only "calibrated" and "unreachable" classes change; the result is also recorded in
    `manifest.quality["calibration"]`. The caller saves the bundle (atomic, re-hashed).
    """
    unknown = set(result) - set(manifest.classes)
    if unknown:
        raise BadInput(f"calibration names classes the bundle lacks: {', '.join(sorted(unknown))}")
    for name, r in result.items():
        if r["status"] in ("calibrated", "unreachable"):
            manifest.postprocess.class_thresholds[name] = float(r["threshold"])
    manifest.quality["calibration"] = {"target_recall": target_recall, "classes": result}
    return manifest
