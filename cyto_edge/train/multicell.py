"""Multi-cell image classification: crops of whole fields labelled by the most severe cell they hold, and a
small training loop for the RCAN / plain / patch-attention classifiers (models/rcan.py, models/jigsaw.py).

Crops are cut at the fields' own scale (never resized) from a detection dataset (e.g. `cyto-edge synth`):
a crop's label is the most severe Bethesda category among the labelled cells lying in it (at least
`inside` of the box's area in the crop); crops that cut an abnormal cell (0 < part inside < `inside`)
are dropped, since their label would be a guess. Organisms map to NILM. `grouping`:
- "grade3": NILM / low-grade (ASC-US, LSIL) / high-grade (ASC-H, AGC, HSIL, SCC);
- "binary": NILM / abnormal (any category above NILM).
Images are (N, S, S, 3) uint8 RGB; labels (N,) int64; `lesions[i]` the (K, 4) xyxy boxes (crop pixels)
of the abnormal cells inside crop i, for measuring where explanations point.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch import nn

from cyto_edge.runtime.taxonomy import SEVERITY, Taxonomy

GROUPINGS: dict[str, tuple[list[str], dict[str, int]]] = {
    "grade3": (["NILM", "low-grade", "high-grade"],
               {"NILM": 0, "ASC-US": 1, "LSIL": 1, "ASC-H": 2, "AGC": 2, "HSIL": 2, "SCC": 2}),
    "binary": (["NILM", "abnormal"], {c: int(c != "NILM") for c in SEVERITY}),
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class CropSet:
    images: np.ndarray                 # (N, S, S, 3) uint8 RGB
    labels: np.ndarray                 # (N,) int64
    classes: list[str]
    lesions: list[np.ndarray] = field(default_factory=list)   # per crop (K, 4) xyxy px of abnormal cells

    def counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.classes)).tolist()


def _label(boxes, cats, x0, y0, size, groups, inside) -> tuple[int | None, np.ndarray]:
    """Group of the most severe cell in the window, or None when an abnormal cell is cut."""
    if len(boxes) == 0:
        return 0, np.zeros((0, 4), np.float32)
    ix1, iy1 = np.maximum(boxes[:, 0], x0), np.maximum(boxes[:, 1], y0)
    ix2, iy2 = np.minimum(boxes[:, 2], x0 + size), np.minimum(boxes[:, 3], y0 + size)
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    frac = inter / np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-6)
    abnormal = np.asarray([SEVERITY[c] > 0 for c in cats])
    if (abnormal & (frac > 0.05) & (frac < inside)).any():
        return None, np.zeros((0, 4), np.float32)
    held = frac >= inside
    sev = [SEVERITY[c] for c, h in zip(cats, held) if h]
    worst = max(sev, default=0)
    group = groups[next(c for c, s in SEVERITY.items() if s == worst)]
    les = boxes[held & abnormal] - np.asarray([x0, y0, x0, y0], np.float32)
    return group, les.astype(np.float32)


def multicell_crops(ds, size: int, per_image: int = 6, seed: int = 0, grouping: str = "grade3",
                    inside: float = 0.6, balance: bool = True) -> CropSet:
    """Crops from every image of a DetectionDataset; half centred (with jitter) on abnormal cells."""
    classes, groups = GROUPINGS[grouping]
    tax = ds.taxonomy or Taxonomy.for_classes(ds.classes)
    rng = np.random.default_rng(seed)
    imgs, labels, lesions = [], [], []
    for rec in ds.images:
        img = cv2.imread(str(rec.file), cv2.IMREAD_COLOR)
        if img is None or min(img.shape[:2]) < size:
            continue
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        H, W = img.shape[:2]
        cats = [tax.category(ds.classes[int(c)]) for c in rec.labels]
        centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b, c in zip(rec.boxes, cats) if SEVERITY[c] > 0]
        for k in range(per_image):
            if centres and k % 2 == 0:
                cx, cy = centres[int(rng.integers(len(centres)))]
                x0 = int(np.clip(cx - size / 2 + rng.uniform(-size / 4, size / 4), 0, W - size))
                y0 = int(np.clip(cy - size / 2 + rng.uniform(-size / 4, size / 4), 0, H - size))
            else:
                x0, y0 = int(rng.integers(0, W - size + 1)), int(rng.integers(0, H - size + 1))
            g, les = _label(rec.boxes, cats, x0, y0, size, groups, inside)
            if g is None:
                continue
            imgs.append(img[y0:y0 + size, x0:x0 + size])
            labels.append(g)
            lesions.append(les)
    y = np.asarray(labels, np.int64)
    keep = np.arange(len(y))
    if balance and len(y):
        n = min(c for c in np.bincount(y, minlength=len(classes)) if c > 0)
        keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n] for c in range(len(classes))]))
    return CropSet(np.stack([imgs[i] for i in keep]) if len(keep) else np.zeros((0, size, size, 3), np.uint8),
                   y[keep], classes, [lesions[i] for i in keep])


# ------------------------------------------------------------------------------------- training

def to_input(u8: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 RGB -> (N, 3, S, S) float normalised."""
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flips and 90-degree turns: cell images have no up or down."""
    if torch.rand(1, generator=gen) < 0.5:
        x = x.flip(3)
    if torch.rand(1, generator=gen) < 0.5:
        x = x.flip(2)
    k = int(torch.randint(0, 4, (1,), generator=gen))
    return torch.rot90(x, k, (2, 3)) if k else x


def fit(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, epochs: int = 10, batch: int = 32,
        lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0, on_epoch=None) -> list[dict]:
    """AdamW, short warm-up then cosine decay, cross-entropy; returns per-epoch loss/accuracy."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * math.ceil(len(labels) / batch))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    y_all = torch.from_numpy(labels)
    hist = []
    for ep in range(epochs):
        model.train()
        t0, loss_sum, correct = time.monotonic(), 0.0, 0
        order = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch].numpy()
            x, y = _augment(to_input(images[idx]), gen), y_all[idx]
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        hist.append({"epoch": ep + 1, "loss": round(loss_sum / len(labels), 4),
                     "accuracy": round(correct / len(labels), 4), "seconds": round(time.monotonic() - t0, 1)})
        if on_epoch:
            on_epoch(hist[-1])
    return hist


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, K) probabilities."""
    model.eval()
    out = [torch.softmax(model(to_input(images[i:i + batch])), 1) for i in range(0, len(images), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def scores(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, the paper's weighted F1 (eq. 1: per-class F1 weighted by class support), per-class F1."""
    f1s, support = [], []
    for c in range(len(classes)):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        p = tp / max(int((y_pred == c).sum()), 1)
        r = tp / max(int((y_true == c).sum()), 1)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
        support.append(int((y_true == c).sum()))
    w = np.asarray(support, np.float64) / max(sum(support), 1)
    return {"accuracy": round(float((y_true == y_pred).mean()), 4) if len(y_true) else None,
            "weighted_f1": round(float((np.asarray(f1s) * w).sum()), 4),
            "f1": {c: round(f, 4) for c, f in zip(classes, f1s)}, "n": int(len(y_true))}


def attribution_in_lesions(attr: np.ndarray, lesions: np.ndarray) -> tuple[float, float]:
    """(share of |attribution| inside the abnormal cells' boxes, share of the image area they cover)."""
    a = np.abs(attr).sum(0)   # (H, W)
    mask = np.zeros(a.shape, bool)
    for x1, y1, x2, y2 in np.round(lesions).astype(int):
        mask[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = True
    return float(a[mask].sum() / max(a.sum(), 1e-12)), float(mask.mean())
