"""Labelled crops: a square window around each labelled object of synthetic fields, class-balanced.

Used by the colour-separability test and the docs grid (and handy for cell-classifier experiments).
A crop is a `window`-pixel square centred on the object's box (default 160 px: the largest object
fits, so every class is seen through the same physical window with its usual surroundings), clamped
inside the field, resized to `out` x `out`. With `tight`, the crop is the box itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cyto_edge.runtime.taxonomy import DEFAULT_CLASSES
from cyto_edge.synth.field import plan_field, render_field
from cyto_edge.synth.shapes import Textures


@dataclass
class CropSet:
    images: np.ndarray      # (N, out, out, 3) uint8 BGR
    labels: np.ndarray      # (N,) int64 index into `classes`
    boxes: np.ndarray       # (N, 4) float xyxy of the object in crop pixels (after resizing)
    classes: tuple[str, ...]


def labelled_crops(n_per_class: int, seed: int, window: int = 160, out: int = 80, field: int = 512,
                   per_field: int = 4, um_per_px: float = 1.0, tight: bool = False,
                   classes: tuple[str, ...] = DEFAULT_CLASSES) -> CropSet:
    """n_per_class crops of every class, from fields of `field` px holding `per_field` labelled objects."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC809]))
    tex = Textures(rng, 1.0 / um_per_px)
    count = dict.fromkeys(classes, 0)
    crops, labels, boxes = [], [], []
    area_mm2 = (field * um_per_px / 1000.0) ** 2
    for _ in range(50 * n_per_class * len(classes)):
        if min(count.values()) >= n_per_class:
            break
        need = [c for c in classes if count[c] < n_per_class]
        pick = [str(c) for c in rng.choice(need, size=min(per_field, len(need)), replace=False)]
        plan = plan_field(rng, area_mm2, classes=pick, kind="lesion")
        plan.labelled = pick  # one object of each picked class
        f = render_field(rng, field, field, um_per_px, plan, textures=tex)
        for box, c in zip(f.boxes, f.labels):
            if count[c] >= n_per_class:
                continue
            img, b = _crop(f.image, box, window, out, tight)
            crops.append(img)
            boxes.append(b)
            labels.append(classes.index(c))
            count[c] += 1
    if min(count.values()) < n_per_class:
        raise RuntimeError(f"could not place {n_per_class} objects of every class in {field} px fields: {count}")
    return CropSet(np.stack(crops), np.asarray(labels, np.int64), np.asarray(boxes), tuple(classes))


def _crop(img: np.ndarray, box: np.ndarray, window: int, out: int, tight: bool) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    if tight:
        sx, sy, sw, sh = x0, y0, max(1, x1 - x0), max(1, y1 - y0)
    else:
        sw = sh = min(max(window, x1 - x0, y1 - y0), h, w)
        sx = int(np.clip((x0 + x1) // 2 - sw // 2, 0, w - sw))
        sy = int(np.clip((y0 + y1) // 2 - sh // 2, 0, h - sh))
    patch = cv2.resize(img[sy:sy + sh, sx:sx + sw], (out, out), interpolation=cv2.INTER_AREA)
    scale = np.array([out / sw, out / sh, out / sw, out / sh])
    return patch, (np.asarray(box, np.float64) - (sx, sy, sx, sy)) * scale
