"""Precision-recall curve PNGs drawn with OpenCV (the device install has no matplotlib).

`write_pr_plots(metrics, out_dir)` writes `pr_<class>.png` for each class with ground truth (the raw
curve at IoU 0.5, its interpolated envelope, the operating point and the best-F1 point) and
`pr_all.png` (every class, legend with AP@0.5).
"""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.runtime.metrics import RECALL_POINTS, ClassMetrics, DetectionMetrics

W, H = 720, 540                     # canvas px
L, R, T, BOT = 70, 20, 40, 60       # margins px: plot area is [L, W-R] x [T, H-BOT]
FONT = cv2.FONT_HERSHEY_SIMPLEX
GREY, BLACK, WHITE = (200, 200, 200), (30, 30, 30), (255, 255, 255)
ENVELOPE = (90, 90, 90)
PALETTE = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148), (75, 86, 140),
           (194, 119, 227), (127, 127, 127), (34, 189, 188), (207, 190, 23), (0, 0, 139), (0, 100, 0)]  # BGR


def _px(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(N,) recall, (N,) precision in [0, 1] -> (N, 1, 2) int32 canvas points for cv2.polylines."""
    x = L + np.clip(recall, 0, 1) * (W - L - R)
    y = (H - BOT) - np.clip(precision, 0, 1) * (H - BOT - T)
    return np.round(np.stack([x, y], 1)).astype(np.int32).reshape(-1, 1, 2)


def _axes(title: str) -> np.ndarray:
    img = np.full((H, W, 3), 255, np.uint8)
    for v in np.linspace(0, 1, 6):
        (x0, y0), = _px(np.array([v]), np.array([0.0]))[:, 0]
        (x1, y1), = _px(np.array([0.0]), np.array([v]))[:, 0]
        cv2.line(img, (x0, T), (x0, H - BOT), GREY, 1)
        cv2.line(img, (L, y1), (W - R, y1), GREY, 1)
        cv2.putText(img, f"{v:.1f}", (x0 - 12, H - BOT + 20), FONT, 0.45, BLACK, 1, cv2.LINE_AA)
        cv2.putText(img, f"{v:.1f}", (L - 38, y1 + 5), FONT, 0.45, BLACK, 1, cv2.LINE_AA)
    cv2.rectangle(img, (L, T), (W - R, H - BOT), BLACK, 1)
    cv2.putText(img, "Recall", ((L + W - R) // 2 - 25, H - 15), FONT, 0.6, BLACK, 1, cv2.LINE_AA)
    label = np.full((24, 100, 3), 255, np.uint8)
    cv2.putText(label, "Precision", (2, 18), FONT, 0.6, BLACK, 1, cv2.LINE_AA)
    label = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)  # (100, 24, 3)
    y0 = (T + H - BOT) // 2 - 50
    img[y0:y0 + 100, 4:28] = np.minimum(img[y0:y0 + 100, 4:28], label)
    cv2.putText(img, title, (L, 26), FONT, 0.6, BLACK, 1, cv2.LINE_AA)
    return img


def _step(recall: np.ndarray, precision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw per-rank points -> a staircase starting at recall 0 (what a PR plot shows)."""
    r = np.repeat(np.r_[0.0, recall], 2)[1:]
    p = np.repeat(np.r_[precision[:1] if len(precision) else [1.0], precision], 2)[:-1]
    return r, p


def _legend(img: np.ndarray, entries: list[tuple[str, tuple]]) -> None:
    x, y = W - R - 230, H - BOT - 18 * len(entries) - 8
    cv2.rectangle(img, (x - 6, y - 14), (W - R - 4, H - BOT - 6), WHITE, -1)
    cv2.rectangle(img, (x - 6, y - 14), (W - R - 4, H - BOT - 6), GREY, 1)
    for i, (text, colour) in enumerate(entries):
        yy = y + 18 * i
        cv2.line(img, (x, yy - 4), (x + 22, yy - 4), colour, 3)
        cv2.putText(img, text, (x + 30, yy), FONT, 0.45, BLACK, 1, cv2.LINE_AA)


def _write(path: Path, img: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise BadInput(f"{path}: cannot write the PNG (check the directory and the .png suffix)")
    return path


def _mark(img, recall: float, precision: float, colour, text: str) -> None:
    (x, y), = _px(np.array([recall]), np.array([precision]))[:, 0]
    cv2.circle(img, (int(x), int(y)), 6, colour, 2, cv2.LINE_AA)
    (tw, _), _ = cv2.getTextSize(text, FONT, 0.42, 1)
    tx = int(x) + 8 if x + 8 + tw < W - 4 else int(x) - 8 - tw   # keep the label on the canvas
    cv2.putText(img, text, (tx, max(int(y) - 8, 12)), FONT, 0.42, colour, 1, cv2.LINE_AA)


def plot_class(c: ClassMetrics, path: str | Path, colour=PALETTE[0]) -> Path:
    """One class: raw PR staircase at IoU 0.5, the interpolated envelope, operating and best-F1 points."""
    ap = "n/a" if c.ap50 is None else f"{c.ap50:.3f}"
    img = _axes(f"{c.name}: AP@0.5 {ap}  (n_gt {c.n_gt}, n_det {c.n_det})")
    if len(c.raw_recall):
        cv2.polylines(img, [_px(*_step(c.raw_recall, c.raw_precision))], False, colour, 2, cv2.LINE_AA)
    if len(c.pr_precision):
        cv2.polylines(img, [_px(RECALL_POINTS, c.pr_precision)], False, ENVELOPE, 1, cv2.LINE_AA)
    if c.recall is not None and c.precision is not None:
        _mark(img, c.recall, c.precision, (40, 39, 214), f"thr {c.threshold:.2f}")
    if c.f1_threshold is not None and len(c.raw_scores):
        i = int(np.flatnonzero(c.raw_scores >= c.f1_threshold)[-1])
        _mark(img, c.raw_recall[i], c.raw_precision[i], (44, 160, 44), f"best F1 {c.f1:.2f} @ {c.f1_threshold:.2f}")
    _legend(img, [("raw, IoU 0.5", colour), ("101-pt envelope", ENVELOPE)])
    return _write(path, img)


def plot_overview(m: DetectionMetrics, path: str | Path) -> Path:
    """Every class with ground truth on one chart, legend `name  AP`."""
    title = "PR curves at IoU 0.5"
    if m.map50 is not None:
        title += f": mAP@0.5 {m.map50:.3f}, mAP@[.5:.95] {m.map:.3f}"
    img = _axes(title)
    entries = []
    for i, c in enumerate(cl for cl in m.classes if cl.ap50 is not None):
        colour = PALETTE[i % len(PALETTE)]
        if len(c.raw_recall):
            cv2.polylines(img, [_px(*_step(c.raw_recall, c.raw_precision))], False, colour, 2, cv2.LINE_AA)
        entries.append((f"{c.name[:16]:<16} {c.ap50:.3f}", colour))
    if entries:
        _legend(img, entries)
    return _write(path, img)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "class"


def write_pr_plots(m: DetectionMetrics, out_dir: str | Path) -> list[Path]:
    """pr_<class>.png for each class with ground truth, and pr_all.png; returns the paths written."""
    out = Path(out_dir)
    paths = [plot_class(c, out / f"pr_{safe_name(c.name)}.png", PALETTE[i % len(PALETTE)])
             for i, c in enumerate(cl for cl in m.classes if cl.ap50 is not None)]
    paths.append(plot_overview(m, out / "pr_all.png"))
    return paths
