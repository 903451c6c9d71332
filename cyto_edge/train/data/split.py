"""A seeded validation split carved from train; checkpoints are chosen on it, never on test.

Stratified: each image's stratum is (boxed or weak, the rarest class it holds), classes ranked by how
many images of the set hold them; images holding no class form their own stratum. Within the order
(stratum, seeded shuffle), every 1/f-th image goes to val, so each stratum, weak images included,
gives val its share and the val size is round(f * N). The result depends only on the seed and on the
set's images (not on their order in the annotation file).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.train.data.types import DetectionDataset


def _strata(ds: DetectionDataset) -> list[tuple[int, int]]:
    """(boxed flag, rarest class or num_classes for none) per image."""
    holders = np.zeros(ds.num_classes, np.int64)  # images holding each class
    for im in ds.images:
        for c in im.classes_present:
            holders[c] += 1
    out = []
    for im in ds.images:
        present = sorted(im.classes_present)
        rarest = min(present, key=lambda c: (holders[c], c)) if present else ds.num_classes
        out.append((int(im.boxed), int(rarest)))
    return out


def split_indices(ds: DetectionDataset, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices) into ds.images, both sorted; see the module docstring."""
    n = len(ds.images)
    if not 0.0 < val_fraction < 1.0:
        raise BadInput(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction:g}")
    if n < 2:
        raise BadInput(f"{ds.root}: {n} image(s): a validation split needs at least 2")
    rng = np.random.default_rng(seed)
    # A stable identity for each image, so that the split does not depend on the file's order.
    keys = [f"{Path(im.file).name}|{im.image_id!r}" for im in ds.images]
    by_key = sorted(range(n), key=lambda i: keys[i])
    noise = np.empty(n)
    noise[by_key] = rng.random(n)
    strata = _strata(ds)
    order = sorted(range(n), key=lambda i: (strata[i], noise[i]))
    n_val = min(max(1, int(round(val_fraction * n))), n - 1)
    step = n / n_val
    offset = rng.random() * step
    picks = {order[min(int(offset + k * step), n - 1)] for k in range(n_val)}
    val = sorted(picks)
    train = sorted(set(range(n)) - picks)
    return train, val


def split_dataset(ds: DetectionDataset, val_fraction: float, seed: int) -> tuple[DetectionDataset, DetectionDataset]:
    """(train, val) subsets of `ds`: deterministic for a seed, disjoint, stratified (module docstring)."""
    tr, va = split_indices(ds, val_fraction, seed)
    train, val = ds.subset(tr), ds.subset(va)
    train.name, val.name = "train.split", "val.split"
    return train, val


def write_split(ds: DetectionDataset, val_fraction: float, seed: int, out_dir: Path) -> dict:
    """Write `train.split.json` and `val.split.json` (COCO with the extensions) in `out_dir`."""
    from cyto_edge.train.data.coco import write_coco

    train, val = split_dataset(ds, val_fraction, seed)
    out_dir = Path(out_dir)
    paths = {"train": write_coco(train, out_dir / "train.split.json"),
             "val": write_coco(val, out_dir / "val.split.json")}
    return {"seed": seed, "val_fraction": val_fraction, "files": {k: str(v) for k, v in paths.items()},
            "counts": {k: _counts(s) for k, s in (("train", train), ("val", val))}}


def _counts(ds: DetectionDataset) -> dict:
    weak = sum(1 for im in ds.images if not im.boxed)
    per_class = ds.class_counts()
    return {"images": len(ds), "boxed_images": len(ds) - weak, "weak_images": weak,
            "boxes": int(per_class.sum()),
            "boxes_per_class": {c: int(k) for c, k in zip(ds.classes, per_class)}}
