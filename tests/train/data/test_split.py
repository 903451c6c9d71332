"""The seeded validation split: deterministic, disjoint, stratified; split files load in pycocotools."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.train.data import load_detection, split_dataset
from cyto_edge.train.data.types import DetectionDataset, ImageRecord


def synthetic_set(n_boxed=180, n_weak=40, seed=0) -> DetectionDataset:
    """In-memory set: class 5 is rare (in 10 images), weak images labelled too."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n_boxed):
        labels = [int(c) for c in rng.integers(0, 3, 1 + i % 3)] + ([5] if i % 18 == 0 else [])
        boxes = np.tile(np.array([[10, 10, 50, 50]], np.float32), (len(labels), 1))
        images.append(ImageRecord(file=f"/d/b{i}.png", width=100, height=100, image_id=i, boxes=boxes,
                                  labels=np.array(labels, np.int64)))
    for i in range(n_weak):
        images.append(ImageRecord(file=f"/d/w{i}.png", width=100, height=100, image_id=f"w{i}", boxed=False,
                                  image_labels=frozenset({int(rng.integers(0, 3))})))
    return DetectionDataset(root="/d", classes=[f"c{k}" for k in range(6)], images=images)


def _ids(ds):
    return [im.image_id for im in ds.images]


def test_split_deterministic_disjoint_and_order_free():
    ds = synthetic_set()
    tr, va = split_dataset(ds, 0.1, seed=3)
    tr2, va2 = split_dataset(ds, 0.1, seed=3)
    assert _ids(tr) == _ids(tr2) and _ids(va) == _ids(va2)
    assert set(_ids(tr)).isdisjoint(_ids(va)) and len(tr) + len(va) == len(ds)
    assert len(va) == 22  # round(0.1 * 220)
    shuffled = DetectionDataset(ds.root, ds.classes, random.Random(1).sample(ds.images, len(ds.images)))
    assert set(_ids(split_dataset(shuffled, 0.1, seed=3)[1])) == set(_ids(va))  # file order does not matter
    other = set(_ids(split_dataset(ds, 0.1, seed=4)[1]))
    assert other != set(_ids(va))


def test_split_stratified_rare_class_and_weak_images():
    ds = synthetic_set()
    for seed in range(5):
        tr, va = split_dataset(ds, 0.1, seed)
        rare = sum(1 for im in va.images if 5 in im.classes_present)
        weak = sum(1 for im in va.images if not im.boxed)
        assert rare == 1  # 10 images hold class 5; 10% of them
        assert 3 <= weak <= 5  # 40 weak images; 10% of them
        per_class = Counter(c for im in va.images for c in im.classes_present)
        assert all(per_class[c] > 0 for c in range(3))


def test_split_bad_fraction():
    with pytest.raises(BadInput, match="val-fraction"):
        split_dataset(synthetic_set(), 1.5, 0)


def test_split_command_writes_coco_files_pycocotools_loads(coco_root, run_cli):
    from pycocotools.coco import COCO

    code, out, err = run_cli("data", "split", coco_root, "--val-fraction", "0.25", "--seed", "0")
    assert code == 0, err
    assert "train.split.json" in out and "val.split.json" in out
    full = load_detection(coco_root, "train")
    val = load_detection(coco_root, "val")  # val.split.json
    train = load_detection(coco_root, "train.split")
    assert len(val) == 4 and len(train) == 12
    assert set(_ids(val)).isdisjoint(_ids(train)) and set(_ids(val)) | set(_ids(train)) == set(_ids(full))
    assert val.um_per_px == 0.5
    kept = {im.image_id: im for im in full.images}
    for im in val.images + train.images:
        np.testing.assert_allclose(im.boxes, kept[im.image_id].boxes, atol=0.01)
        assert im.truth == kept[im.image_id].truth and im.classes_present == kept[im.image_id].classes_present
    for name in ("train.split.json", "val.split.json"):
        coco = COCO(str(coco_root / name))
        assert len(coco.getImgIds()) == {"train.split.json": 12, "val.split.json": 4}[name]
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())][:3] == ["ascus", "asch", "lsil"]
    # COCOeval on val: its own boxes as detections score AP 1 (ids of one type, boxes in xywh)
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco_root / "val.split.json"))
        dets = gt.loadRes([{**a, "score": 1.0} for a in gt.dataset["annotations"]])
        ev = COCOeval(gt, dets, "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0)  # AP@0.5
    # same seed, same files
    before = (coco_root / "val.split.json").read_text()
    assert run_cli("data", "split", coco_root, "--val-fraction", "0.25", "--seed", "0")[0] == 0
    assert (coco_root / "val.split.json").read_text() == before
