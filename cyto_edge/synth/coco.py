"""COCO documents for synthetic sets, and the train-side label noise.

Boxes inside the renderer are xyxy pixels; COCO wants [x, y, w, h] pixels. Category ids are 1-based in
the default taxonomy order (runtime/taxonomy.py), named by class, with the Bethesda category as
supercategory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cyto_edge import __version__
from cyto_edge.runtime.taxonomy import DEFAULT_CLASSES, DEFAULT_MAPPING

GENERATOR = "cyto-edge synth"
CATEGORIES = [{"id": i + 1, "name": c, "supercategory": DEFAULT_MAPPING[c]} for i, c in enumerate(DEFAULT_CLASSES)]
CAT_ID = {c["name"]: c["id"] for c in CATEGORIES}


@dataclass
class ImageEntry:
    """One rendered field as the writer keeps it (no pixels)."""

    file_name: str                     # relative to the split folder
    width: int
    height: int
    boxes: np.ndarray                  # (K, 4) float xyxy pixels, exact
    labels: list[str]                  # (K,) class names
    truth: dict
    weak: bool = False
    noisy: np.ndarray | None = None    # (K', 4) boxes after label noise (train)
    noisy_labels: list[str] = field(default_factory=list)

    @property
    def image_labels(self) -> list[str]:
        present = set(self.labels)
        return [c for c in DEFAULT_CLASSES if c in present]


def coco_document(entries: list[ImageEntry], info: dict, mode: str) -> dict:
    """mode 'clean': exact boxes for every image (weak ones flagged); 'train': noisy boxes, weak images
    without annotations but with `image_labels`; 'test': exact boxes."""
    images, anns = [], []
    for i, e in enumerate(entries, start=1):
        img = {"id": i, "file_name": e.file_name, "width": e.width, "height": e.height, "truth": e.truth}
        if mode == "clean":
            img["weak"] = e.weak
        if mode == "train" and e.weak:
            img["image_labels"] = e.image_labels
            images.append(img)
            continue
        images.append(img)
        if mode == "train" and e.noisy is not None:
            boxes, labels = e.noisy, e.noisy_labels
        else:
            boxes, labels = e.boxes, e.labels
        for b, c in zip(boxes, labels):
            x0, y0, x1, y1 = (round(float(v), 2) for v in b)
            w, h = round(x1 - x0, 2), round(y1 - y0, 2)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": CAT_ID[c],
                         "bbox": [x0, y0, w, h], "area": round(w * h, 2), "iscrowd": 0})
    return {"info": {"generator": GENERATOR, "version": __version__, **info}, "licenses": [],
            "categories": CATEGORIES, "images": images, "annotations": anns}


def apply_label_noise(rng: np.random.Generator, entries: list[ImageEntry], drop: float, jitter: float) -> dict:
    """Noisy copies of the boxes of the boxed (non-weak) entries, in place.

    drop: exactly round(drop x N) of the N boxes are removed, chosen at random over the whole split.
    jitter: every kept box moves by up to jitter x (w, h) and each side length scales by a factor in
    [1 - jitter, 1 + jitter]; the result is clipped to the image and kept at least 2 px wide.
    """
    boxed = [e for e in entries if not e.weak]
    index = [(k, j) for k, e in enumerate(boxed) for j in range(len(e.labels))]
    n_drop = int(round(drop * len(index)))
    dropped = {index[i] for i in rng.permutation(len(index))[:n_drop]} if n_drop else set()
    moved = 0
    for k, e in enumerate(boxed):
        keep = [j for j in range(len(e.labels)) if (k, j) not in dropped]
        boxes = e.boxes[keep].astype(np.float64).reshape(-1, 4)
        if jitter > 0 and len(boxes):
            boxes = _jitter(rng, boxes, jitter, e.width, e.height)
            moved += len(boxes)
        e.noisy, e.noisy_labels = boxes, [e.labels[j] for j in keep]
    return {"boxes": len(index), "dropped": n_drop, "jittered": moved}


def _jitter(rng: np.random.Generator, b: np.ndarray, j: float, width: int, height: int) -> np.ndarray:
    """(K, 4) xyxy -> (K, 4) xyxy moved and resized by up to j of each box's size."""
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx = (b[:, 0] + b[:, 2]) / 2 + rng.uniform(-j, j, len(b)) * w
    cy = (b[:, 1] + b[:, 3]) / 2 + rng.uniform(-j, j, len(b)) * h
    nw, nh = w * (1 + rng.uniform(-j, j, len(b))), h * (1 + rng.uniform(-j, j, len(b)))
    out = np.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], 1)
    out[:, 0::2] = np.clip(out[:, 0::2], 0, width)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, height)
    out[:, 2] = np.maximum(out[:, 2], np.minimum(out[:, 0] + 2, width))
    out[:, 3] = np.maximum(out[:, 3], np.minimum(out[:, 1] + 2, height))
    out[:, 0] = np.minimum(out[:, 0], out[:, 2] - 2)
    out[:, 1] = np.minimum(out[:, 1], out[:, 3] - 2)
    return out
