"""Multi-cell crops labelled by their most severe cell, the weighted F1, and the short training loop."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cyto_edge.runtime.taxonomy import Taxonomy
from cyto_edge.train.data.types import DetectionDataset, ImageRecord
from cyto_edge.train.models.rcan import build_classifier
from cyto_edge.train.multicell import (_label, attribution_in_lesions, fit, multicell_crops, predict, scores)

GROUPS = {"NILM": 0, "ASC-US": 1, "LSIL": 1, "ASC-H": 2, "AGC": 2, "HSIL": 2, "SCC": 2}


def test_label_most_severe_inside_and_cut_cells_dropped():
    boxes = np.array([[10, 10, 30, 30], [50, 50, 70, 70], [90, 10, 110, 30]], np.float32)
    cats = ["LSIL", "HSIL", "NILM"]
    g, les = _label(boxes, cats, 0, 0, 80, GROUPS, 0.6)          # LSIL and HSIL inside
    assert g == 2 and len(les) == 2
    g, les = _label(boxes, cats, 0, 0, 40, GROUPS, 0.6)          # LSIL only
    assert g == 1 and les.tolist() == [[10, 10, 30, 30]]
    assert _label(boxes, cats, 0, 0, 60, GROUPS, 0.6)[0] is None  # HSIL cut in half: no label
    g, _ = _label(boxes, cats, 85, 0, 40, GROUPS, 0.6)           # a NILM-mapped object only
    assert g == 0


def test_crops_from_a_dataset(tmp_path):
    img = np.full((200, 200, 3), 230, np.uint8)
    cv2.circle(img, (50, 50), 12, (90, 40, 120), -1)
    f = tmp_path / "f.png"
    cv2.imwrite(str(f), img)
    tax = Taxonomy()
    rec = ImageRecord(f, 200, 200, 1, boxes=np.array([[38, 38, 62, 62], [150, 150, 170, 170]], np.float32),
                      labels=np.array([tax.index("hsil"), tax.index("candida")], np.int64))
    ds = DetectionDataset(tmp_path, list(tax.classes), [rec], tax)
    cs = multicell_crops(ds, 64, per_image=40, seed=0, grouping="binary", balance=False)
    assert cs.images.shape[1:] == (64, 64, 3) and set(cs.labels.tolist()) <= {0, 1}
    for y, les in zip(cs.labels, cs.lesions):
        assert (y == 1) == (len(les) == 1)          # abnormal crops carry the hsil box, NILM crops none
    bal = multicell_crops(ds, 64, per_image=40, seed=0, grouping="binary")
    assert bal.counts()[0] == bal.counts()[1] > 0


def test_weighted_f1_matches_definition():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 1, 0, 1, 1, 0])
    s = scores(y, p, ["a", "b", "c"])
    f1 = [2 * (2 / 3) * (2 / 3) / (4 / 3), 2 * (2 / 3) * 1 / (5 / 3), 0.0]
    assert s["weighted_f1"] == pytest.approx(round((3 * f1[0] + 2 * f1[1]) / 6, 4))
    assert s["accuracy"] == pytest.approx(4 / 6, abs=1e-4)


def test_attribution_share():
    attr = np.zeros((3, 10, 10), np.float32)
    attr[0, 2:4, 2:4] = 1.0
    attr[1, 8, 8] = -1.0
    inside, area = attribution_in_lesions(attr, np.array([[2, 2, 4, 4]], np.float32))
    assert inside == pytest.approx(0.8) and area == pytest.approx(0.04)


def test_fit_learns_a_separable_task():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, (48, 24, 24, 3), dtype=np.uint8)
    y = np.arange(48) % 2
    x[y == 1, 8:16, 8:16] = 250                                  # a bright "nucleus" in class 1
    m = build_classifier("rcan", 2, widths=(8, 8, 8), groups=1, blocks=1, reduction=2)
    torch.set_num_threads(1)
    hist = fit(m, x, y, epochs=12, batch=16, lr=5e-3)   # enough steps for the BN running statistics
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert (predict(m, x).argmax(1) == y).mean() > 0.8
