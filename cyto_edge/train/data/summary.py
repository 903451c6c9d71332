"""Numbers about a dataset for `data check` and `data stats`, as plain dicts (the --json output).

Box sizes: `side` is sqrt(w * h) in pixels; `min short side` is the smallest min(w, h) and `max long
side` the largest max(w, h), the two figures that bound priors (the smallest object) and tile overlap
(the largest object). µm figures appear when the set records its µm per pixel.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from cyto_edge.runtime.taxonomy import SEVERITY
from cyto_edge.train.data.types import ClassificationDataset, DetectionDataset

PERCENTILES = (5, 25, 50, 75, 95)
HIST_BINS = ((0, 0, "0"), (1, 1, "1"), (2, 5, "2-5"), (6, 10, "6-10"), (11, 20, "11-20"), (21, None, ">20"))


def _r(x: float) -> float:
    return round(float(x), 2)


def _flat(ds: DetectionDataset) -> tuple[np.ndarray, np.ndarray]:
    """All boxes of the set at once: (K, 2) widths and heights in px, (K,) labels."""
    if not ds.images:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
    boxes = np.concatenate([im.boxes.reshape(-1, 4) for im in ds.images], 0)
    labels = np.concatenate([im.labels.reshape(-1) for im in ds.images], 0)
    return boxes[:, 2:] - boxes[:, :2], labels


def _sides(wh: np.ndarray, um: float | None) -> dict:
    if len(wh) == 0:
        return {}
    side = np.sqrt(wh[:, 0] * wh[:, 1])
    out = {"min_short_side_px": _r(wh.min(1).min()), "median_side_px": _r(np.median(side)),
           "max_long_side_px": _r(wh.max(1).max())}
    if um:
        out.update({k.replace("_px", "_um"): _r(v * um) for k, v in list(out.items())})
    return out


def _class_rows(ds: DetectionDataset) -> list[dict]:
    wh, labels = _flat(ds)
    boxed_holders = np.zeros(ds.num_classes, np.int64)  # boxed images holding each class
    weak_holders = np.zeros(ds.num_classes, np.int64)
    for im in ds.images:
        present = list(im.classes_present)
        np.add.at(boxed_holders if im.boxed else weak_holders, present, 1)
    rows = []
    for c, name in enumerate(ds.classes):
        row = {"name": name, "category": ds.taxonomy.category(name) if ds.taxonomy else "",
               "boxes": int((labels == c).sum()), "boxed_images": int(boxed_holders[c]),
               "weak_images": int(weak_holders[c])}
        row.update(_sides(wh[labels == c], ds.um_per_px))
        rows.append(row)
    return rows


def _image_sizes(ds: DetectionDataset) -> dict:
    sizes = Counter((im.width, im.height) for im in ds.images)
    ws = [im.width for im in ds.images]
    hs = [im.height for im in ds.images]
    return {"distinct": [{"width": w, "height": h, "images": n} for (w, h), n in sizes.most_common()],
            "min_width": min(ws), "max_width": max(ws), "min_height": min(hs), "max_height": max(hs)}


def check_summary(ds: DetectionDataset, fmt: str) -> dict:
    weak = sum(1 for im in ds.images if not im.boxed)
    return {"format": fmt, "root": str(ds.root), "split": ds.name, "images": len(ds),
            "boxed_images": len(ds) - weak, "weak_images": weak, "boxes": int(ds.class_counts().sum()),
            "um_per_px": ds.um_per_px, "classes": _class_rows(ds), "image_sizes": _image_sizes(ds),
            "box_sizes": _sides(_flat(ds)[0], ds.um_per_px), "warnings": len(ds.warnings),
            "warning_examples": ds.warnings[:5], "fingerprint": ds.fingerprint()}


def _objects_per_image(ds: DetectionDataset) -> dict:
    n = np.array([len(im.labels) for im in ds.images if im.boxed], np.int64)
    if len(n) == 0:
        return {"boxed_images": 0}
    hist = {}
    for lo, hi, label in HIST_BINS:
        hist[label] = int(((n >= lo) & (n <= hi if hi is not None else True)).sum())
    return {"boxed_images": int(len(n)), "mean": _r(n.mean()), "median": _r(np.median(n)),
            "max": int(n.max()), "histogram": hist}


def _percentiles(ds: DetectionDataset) -> list[dict]:
    wh, labels = _flat(ds)
    rows = []
    for c, name in enumerate(ds.classes):
        sel = wh[labels == c]
        if len(sel) == 0:
            continue
        pct = np.percentile(np.sqrt(sel[:, 0] * sel[:, 1]), PERCENTILES)
        row = {"name": name, "boxes": int(len(sel))}
        row.update({f"p{q}_px": _r(v) for q, v in zip(PERCENTILES, pct)})
        if ds.um_per_px:
            row.update({f"p{q}_um": _r(v * ds.um_per_px) for q, v in zip(PERCENTILES, pct)})
        rows.append(row)
    return rows


def _truth(ds: DetectionDataset) -> dict:
    """Per truth key: counts of values for text keys, min/mean/max for numeric ones."""
    values: dict[str, list] = {}
    for im in ds.images:
        for k, v in im.truth.items():
            values.setdefault(k, []).append(v)
    out = {"images_with_truth": sum(1 for im in ds.images if im.truth)}
    for k, vs in sorted(values.items(), key=lambda kv: (kv[0] != "fov_grade", kv[0])):
        nums = [v for v in vs if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if nums and len(nums) == len(vs):
            out[k] = {"min": _r(min(nums)), "mean": _r(np.mean(nums)), "max": _r(max(nums))}
        elif all(isinstance(v, (str, bool)) for v in vs):
            counts = Counter(str(v) for v in vs)
            keys = sorted(counts, key=lambda g: (SEVERITY.get(g, len(SEVERITY)), -counts[g], g))
            out[k] = {g: counts[g] for g in keys}  # Bethesda grades in severity order
    return out


def stats_summary(ds: DetectionDataset, fmt: str) -> dict:
    weak = [im for im in ds.images if not im.boxed]
    return {"format": fmt, "root": str(ds.root), "split": ds.name, "images": len(ds),
            "boxed_images": len(ds) - len(weak), "weak_images": len(weak),
            "weak_negative_images": sum(1 for im in weak if not im.classes_present),
            "um_per_px": ds.um_per_px, "objects_per_image": _objects_per_image(ds),
            "box_side_percentiles": _percentiles(ds), "truth": _truth(ds)}


def classification_summary(ds: ClassificationDataset, fmt: str) -> dict:
    rows = []
    for c, name in enumerate(ds.classes):
        items = [it for it in ds.items if it.label == c]
        boxes = np.array([it.box for it in items if it.box is not None], np.float32).reshape(-1, 4)
        row = {"name": name, "category": ds.taxonomy.category(name) if ds.taxonomy else "",
               "cells": len(items), "with_box": int(len(boxes))}
        row.update(_sides(boxes[:, 2:] - boxes[:, :2], None))
        rows.append(row)
    return {"format": fmt, "root": str(ds.root), "cells": len(ds), "classes": rows,
            "files": len({str(it.file) for it in ds.items}), "warnings": len(ds.warnings),
            "warning_examples": ds.warnings[:5]}
