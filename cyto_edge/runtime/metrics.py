"""Detection and FOV-level metrics, torch-free (numpy only).

Box level: COCO-style evaluation that reproduces pycocotools' `COCOeval` (iouType "bbox", areaRng
"all", maxDets 100) to within floating-point rounding:

- per image and class, detections sorted by descending score with a *stable* sort (input order breaks
  ties, as COCOeval's mergesort) and cut to `max_dets`;
- greedy matching per IoU threshold (.50:.05:.95): each detection takes the unmatched ground truth of
  highest IoU >= the threshold (the last one among equal IoUs, as COCOeval's loop does);
- detections of a class are pooled over the images in list order (COCOeval pools over sorted image ids;
  give image ids in list order to compare) and sorted again, stably, by score;
- precision made monotone (the envelope), sampled at 101 recall points (0, .01, ..., 1); AP is its mean;
- a class without any ground truth gets no AP (COCOeval writes -1) and is left out of the means;
  images without ground truth contribute their detections as false positives.
Only iscrowd=0 is supported: every ground-truth box is a regular object (no crowd regions, no ignore
flags, no area ranges). Images that are not fully annotated (`boxed=False`, image-level labels only)
are skipped by default, since their missing boxes would count every true detection as a false positive.

Inputs, per image: ground truth as an `ImageRecord` (cyto_edge.train.data.types), a dict with
`boxes`/`labels` (and optionally `boxed`) or a `(boxes, labels)` tuple; predictions as
`runtime.decode.Detections`, a dict with `boxes`/`scores`/`labels` or a `(boxes, scores, labels)` tuple.
Boxes are (K, 4) xyxy pixels; labels are foreground class indices 0..C-1.

FOV level: sensitivity and specificity of predicted Bethesda grades against the true grades for a
positive threshold category (default ">= ASC-US"), and the confusion matrix over BETHESDA_ORDER.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.runtime import boxes as B
from cyto_edge.runtime.taxonomy import BETHESDA_ORDER, SEVERITY

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)   # COCO .50:.05:.95
RECALL_POINTS = np.linspace(0.0, 1.0, 101)    # COCO 101-point interpolation
EPS = np.spacing(1)                           # COCOeval's guard in tp / (tp + fp)


# ------------------------------------------------------------------------------------ inputs

@dataclass
class _Image:
    boxes: np.ndarray   # (G, 4) float64 xyxy px
    labels: np.ndarray  # (G,) int64
    boxed: bool = True


@dataclass
class _Pred:
    boxes: np.ndarray   # (D, 4) float64 xyxy px
    scores: np.ndarray  # (D,) float64
    labels: np.ndarray  # (D,) int64


def _get(obj: Any, name: str, pos: int, default=None):
    """A field of a dict, a tuple/list (by position) or an object (by attribute)."""
    if isinstance(obj, dict):
        v = obj.get(name)
    elif isinstance(obj, (tuple, list)):
        v = obj[pos] if pos < len(obj) else None
    else:
        v = getattr(obj, name, None)
    return default if v is None else v


def as_ground_truth(obj: Any, num_classes: int, where: str = "ground truth") -> _Image:
    """ImageRecord, {'boxes','labels','boxed'} or (boxes, labels[, boxed]) -> validated arrays."""
    b = np.asarray(_get(obj, "boxes", 0, np.zeros((0, 4))), np.float64).reshape(-1, 4)
    lab = np.asarray(_get(obj, "labels", 1, np.zeros(0)), np.int64).reshape(-1)
    _check(b, lab, num_classes, where)
    return _Image(b, lab, bool(_get(obj, "boxed", 2, True)))


def as_predictions(obj: Any, num_classes: int, where: str = "predictions") -> _Pred:
    """Detections, {'boxes','scores','labels'} or (boxes, scores, labels) -> validated arrays."""
    if obj is None:
        return _Pred(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    b = np.asarray(_get(obj, "boxes", 0, np.zeros((0, 4))), np.float64).reshape(-1, 4)
    s = np.asarray(_get(obj, "scores", 1, np.zeros(0)), np.float64).reshape(-1)
    lab = np.asarray(_get(obj, "labels", 2, np.zeros(0)), np.int64).reshape(-1)
    if len(s) != len(b):
        raise BadInput(f"{where}: {len(b)} boxes but {len(s)} scores")
    _check(b, lab, num_classes, where)
    return _Pred(b, s, lab)


def _check(b: np.ndarray, lab: np.ndarray, num_classes: int, where: str) -> None:
    if len(lab) != len(b):
        raise BadInput(f"{where}: {len(b)} boxes but {len(lab)} labels")
    if len(lab) and (lab.min() < 0 or lab.max() >= num_classes):
        raise BadInput(f"{where}: label {int(lab.max() if lab.max() >= num_classes else lab.min())} "
                       f"is outside 0..{num_classes - 1} ({num_classes} classes)")


def prepare_pairs(gt: Sequence, preds: Sequence, num_classes: int, include_weak: bool):
    """-> (list of (_Image, _Pred) kept in list order, number of weak images skipped)."""
    if len(gt) != len(preds):
        raise BadInput(f"{len(gt)} ground-truth images but {len(preds)} prediction entries; give one per image")
    pairs, skipped = [], 0
    for i, (g, p) in enumerate(zip(gt, preds)):
        gi = as_ground_truth(g, num_classes, f"ground truth of image {i}")
        if not gi.boxed and not include_weak:
            skipped += 1
            continue
        pairs.append((gi, as_predictions(p, num_classes, f"predictions of image {i}")))
    return pairs, skipped


# ---------------------------------------------------------------------------------- matching

def match_image(det_boxes: np.ndarray, gt_boxes: np.ndarray, iou_thresholds=IOU_THRESHOLDS):
    """COCOeval's greedy matching of one image and class; detections already sorted by score.

    det_boxes (D, 4), gt_boxes (G, 4) xyxy px -> matched (T, D) bool, matched IoU (T, D) float (0 if none).
    """
    thr = np.minimum(np.asarray(iou_thresholds, np.float64), 1 - 1e-10)  # (T,)
    T, D, G = len(thr), len(det_boxes), len(gt_boxes)
    matched, miou = np.zeros((T, D), bool), np.zeros((T, D))
    if D == 0 or G == 0:
        return matched, miou
    ious = B.iou(det_boxes, gt_boxes)                        # (D, G)
    taken = np.zeros((T, G), bool)
    rows = np.arange(T)
    for d in range(D):
        cand = np.where(taken, -1.0, ious[d][None, :])       # (T, G)
        j = G - 1 - np.argmax(cand[:, ::-1], axis=1)         # last index of the best IoU, per threshold
        v = cand[rows, j]
        ok = v >= thr
        matched[ok, d] = True
        miou[ok, d] = v[ok]
        taken[rows[ok], j[ok]] = True
    return matched, miou


@dataclass
class ClassMatches:
    """One class pooled over images: detections in evaluation order (descending score, stable)."""

    scores: np.ndarray   # (D,) float64
    matched: np.ndarray  # (T, D) bool
    ious: np.ndarray     # (T, D) float64, IoU with the matched ground truth
    n_gt: int
    n_images: int        # images where the class has ground truth or detections


def match_class(pairs: list, k: int, iou_thresholds=IOU_THRESHOLDS, max_dets: int | None = 100) -> ClassMatches:
    T = len(iou_thresholds)
    sc, mt, mi, n_gt, n_img = [], [], [], 0, 0
    for g, p in pairs:
        gb = g.boxes[g.labels == k]
        sel = np.flatnonzero(p.labels == k)
        if len(gb) == 0 and len(sel) == 0:
            continue
        n_img += 1
        n_gt += len(gb)
        order = sel[np.argsort(-p.scores[sel], kind="mergesort")][:max_dets]
        m, iou = match_image(p.boxes[order], gb, iou_thresholds)
        sc.append(p.scores[order]), mt.append(m), mi.append(iou)
    if not sc:
        return ClassMatches(np.zeros(0), np.zeros((T, 0), bool), np.zeros((T, 0)), 0, 0)
    scores = np.concatenate(sc)
    order = np.argsort(-scores, kind="mergesort")
    return ClassMatches(scores[order], np.concatenate(mt, 1)[:, order], np.concatenate(mi, 1)[:, order],
                        n_gt, n_img)


def pr_points(matched_row: np.ndarray, n_gt: int) -> tuple[np.ndarray, np.ndarray]:
    """(D,) matched flags in score order -> raw (precision, recall) after each detection."""
    tp = np.cumsum(matched_row, dtype=np.float64)
    fp = np.cumsum(~matched_row, dtype=np.float64)
    return tp / (tp + fp + EPS), tp / max(n_gt, 1)


def interpolated_precision(precision: np.ndarray, recall: np.ndarray, scores: np.ndarray):
    """COCOeval: precision envelope sampled at RECALL_POINTS -> (101,) precision, (101,) score there."""
    env = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    ok = idx < len(env)
    q, s = np.zeros(len(RECALL_POINTS)), np.zeros(len(RECALL_POINTS))
    q[ok], s[ok] = env[idx[ok]], scores[idx[ok]]
    return q, s


def group_ends(scores: np.ndarray) -> np.ndarray:
    """Indices of the last detection of each run of equal scores (descending): the operating points."""
    if len(scores) == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])


# ----------------------------------------------------------------------------------- results

def _f(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


@dataclass
class ClassMetrics:
    name: str
    n_gt: int
    n_det: int
    ap50: float | None          # AP at IoU 0.5 (None: no ground truth, COCOeval's -1)
    ap: float | None            # AP@[.5:.95]
    threshold: float            # operating score threshold for precision / recall / mean IoU
    precision: float | None     # at IoU 0.5 and the operating threshold (0 when nothing is detected)
    recall: float | None
    mean_iou: float | None      # of the matched detections at the operating threshold
    f1_threshold: float | None  # score threshold of best F1 at IoU 0.5
    f1: float | None
    pr_precision: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # (101,) interpolated
    pr_scores: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))     # (101,) score there
    raw_precision: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # (D,) per rank
    raw_recall: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    raw_scores: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict:
        return {"name": self.name, "n_gt": self.n_gt, "n_det": self.n_det, "ap50": _f(self.ap50),
                "ap": _f(self.ap), "threshold": float(self.threshold), "precision": _f(self.precision),
                "recall": _f(self.recall), "mean_iou": _f(self.mean_iou), "f1_threshold": _f(self.f1_threshold),
                "f1": _f(self.f1), "pr_curve": {"recall": RECALL_POINTS.round(2).tolist(),
                                                "precision": [round(float(v), 6) for v in self.pr_precision],
                                                "score": [round(float(v), 6) for v in self.pr_scores]}}


@dataclass
class DetectionMetrics:
    classes: list[ClassMetrics]
    map50: float | None       # mean AP@0.5 over classes with ground truth
    map: float | None         # mean AP@[.5:.95] (COCO mAP)
    mean_precision: float | None
    mean_recall: float | None
    n_images: int
    n_weak_skipped: int
    max_dets: int | None

    def by_name(self, name: str) -> ClassMetrics:
        return next(c for c in self.classes if c.name == name)

    def to_dict(self) -> dict:
        return {"map50": _f(self.map50), "map": _f(self.map), "mean_precision": _f(self.mean_precision),
                "mean_recall": _f(self.mean_recall), "n_images": self.n_images,
                "n_weak_skipped": self.n_weak_skipped, "max_dets": self.max_dets,
                "iou_thresholds": IOU_THRESHOLDS.round(2).tolist(),
                "classes": {c.name: c.to_dict() for c in self.classes}}


def _thresholds(score_threshold, classes: Sequence[str]) -> np.ndarray:
    if isinstance(score_threshold, dict):
        unknown = set(score_threshold) - set(classes)
        if unknown:
            raise BadInput(f"score thresholds name unknown classes: {', '.join(sorted(unknown))}")
        return np.array([float(score_threshold.get(c, 0.5)) for c in classes])
    if np.ndim(score_threshold) == 0:
        return np.full(len(classes), float(score_threshold))
    thr = np.asarray(score_threshold, np.float64)
    if thr.shape != (len(classes),):
        raise BadInput(f"{thr.size} score thresholds for {len(classes)} classes")
    return thr


def _class_metrics(name: str, cm: ClassMatches, thr: float) -> ClassMetrics:
    D = len(cm.scores)
    if cm.n_gt == 0:
        return ClassMetrics(name, 0, D, None, None, thr, None, None, None, None, None)
    per_t = []
    for t in range(cm.matched.shape[0]):
        p, r = pr_points(cm.matched[t], cm.n_gt)
        per_t.append(interpolated_precision(p, r, cm.scores)[0].mean())
    prec, rec = pr_points(cm.matched[0], cm.n_gt)
    q, qs = interpolated_precision(prec, rec, cm.scores)
    n_op = int(np.count_nonzero(cm.scores >= thr))   # detections kept at the operating threshold
    tp = int(cm.matched[0, :n_op].sum())
    ends = group_ends(cm.scores)
    f1_thr = f1 = None
    if len(ends):
        f1s = 2 * prec[ends] * rec[ends] / np.maximum(prec[ends] + rec[ends], 1e-12)
        b = int(np.argmax(f1s))
        f1_thr, f1 = float(cm.scores[ends[b]]), float(f1s[b])
    return ClassMetrics(
        name, cm.n_gt, D, float(per_t[0]), float(np.mean(per_t)), thr,
        precision=tp / n_op if n_op else 0.0, recall=tp / cm.n_gt,
        mean_iou=float(cm.ious[0, :n_op][cm.matched[0, :n_op]].mean()) if tp else None,
        f1_threshold=f1_thr, f1=f1, pr_precision=q, pr_scores=qs, raw_precision=prec, raw_recall=rec,
        raw_scores=cm.scores)


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def evaluate_detections(gt: Sequence, preds: Sequence, classes: Sequence[str], *,
                        score_threshold: float | dict | Sequence[float] = 0.5, max_dets: int | None = 100,
                        include_weak: bool = False) -> DetectionMetrics:
    """COCO-style box evaluation (see the module docstring); one entry per image in `gt` and `preds`.

    `score_threshold` (one value, a list per class, or {class: value}, missing classes 0.5) is the
    operating point for the precision / recall / mean-IoU columns; AP uses every detection.
    """
    classes = list(classes)
    pairs, skipped = prepare_pairs(gt, preds, len(classes), include_weak)
    thr = _thresholds(score_threshold, classes)
    per = [_class_metrics(c, match_class(pairs, k, IOU_THRESHOLDS, max_dets), float(thr[k]))
           for k, c in enumerate(classes)]
    return DetectionMetrics(per, _mean(c.ap50 for c in per), _mean(c.ap for c in per),
                            _mean(c.precision for c in per), _mean(c.recall for c in per),
                            len(pairs), skipped, max_dets)


# ---------------------------------------------------------------------------------- FOV level

@dataclass
class FovMetrics:
    positive: str               # grades at least this severe are positive
    n: int
    tp: int
    fn: int
    tn: int
    fp: int
    sensitivity: float | None   # None when there are no positive (or negative) FOVs
    specificity: float | None
    accuracy: float | None      # exact grade agreement
    confusion: list[list[int]]  # rows: true grade, columns: predicted, both in BETHESDA_ORDER

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("positive", "n", "tp", "fn", "tn", "fp", "sensitivity",
                                           "specificity", "accuracy", "confusion")}
        d["labels"] = list(BETHESDA_ORDER)
        return d


def _grade(g: str, where: str) -> int:
    if g not in SEVERITY:
        raise BadInput(f"{where}: {g!r} is not a Bethesda category ({', '.join(BETHESDA_ORDER)})")
    return SEVERITY[g]


def fov_metrics(predicted: Sequence[str], true: Sequence[str], positive: str = "ASC-US") -> FovMetrics:
    """Sensitivity / specificity of FOV grades for `>= positive` (e.g. "ASC-US" or "LSIL")."""
    if len(predicted) != len(true):
        raise BadInput(f"{len(predicted)} predicted grades but {len(true)} true grades")
    cut = _grade(positive, "positive category")
    pi = np.array([_grade(g, f"predicted grade {i}") for i, g in enumerate(predicted)], np.int64)
    ti = np.array([_grade(g, f"true grade {i}") for i, g in enumerate(true)], np.int64)
    conf = np.zeros((len(BETHESDA_ORDER),) * 2, np.int64)
    np.add.at(conf, (ti, pi), 1)
    pp, tp_ = pi >= cut, ti >= cut
    tp, fn = int(np.sum(pp & tp_)), int(np.sum(~pp & tp_))
    tn, fp = int(np.sum(~pp & ~tp_)), int(np.sum(pp & ~tp_))
    return FovMetrics(positive, len(ti), tp, fn, tn, fp,
                      sensitivity=tp / (tp + fn) if tp + fn else None,
                      specificity=tn / (tn + fp) if tn + fp else None,
                      accuracy=float(np.mean(pi == ti)) if len(ti) else None, confusion=conf.tolist())
