"""`cyto-edge synth`: layout, COCO format (pycocotools), per-image truth, label noise, weak images,
determinism, and one-line errors for bad options."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cyto_edge.cli import main
from cyto_edge.runtime.taxonomy import DEFAULT_CLASSES, DEFAULT_MAPPING, DEFAULT_ORGANISMS, most_severe
from cyto_edge.synth.coco import ImageEntry, apply_label_noise
from cyto_edge.synth.options import SynthOptions
from cyto_edge.synth.writer import generate

OPTS = SynthOptions(images=14, size=384, seed=3, drop=0.25, jitter=0.1, weak_fraction=0.5, test_fraction=0.25,
                    slide=False)


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    generate(out, OPTS)
    return out


def load(p: Path) -> dict:
    return json.loads(p.read_text())


def test_layout_and_images(synth_set):
    for name in ("train.json", "test.json", "train.clean.json", "train_labels.csv", "synth.json"):
        assert (synth_set / name).is_file(), name
    train, test = load(synth_set / "train.json"), load(synth_set / "test.json")
    assert len(train["images"]) == OPTS.n_train == 10 and len(test["images"]) == OPTS.n_test == 4
    for split, doc in (("train", train), ("test", test)):
        files = sorted(p.name for p in (synth_set / split).glob("*.jpg"))
        assert files == sorted(im["file_name"] for im in doc["images"])
        for im in doc["images"]:
            img = cv2.imread(str(synth_set / split / im["file_name"]))
            assert img is not None and img.shape == (im["height"], im["width"], 3) == (384, 384, 3)
    assert not (synth_set / "slide").exists()


def test_pycocotools_loads_and_categories(synth_set):
    from pycocotools.coco import COCO

    for name in ("train.json", "test.json", "train.clean.json"):
        coco = COCO(str(synth_set / name))
        cats = coco.loadCats(coco.getCatIds())
        assert [c["name"] for c in cats] == list(DEFAULT_CLASSES)
        assert [c["id"] for c in cats] == list(range(1, 12))
        assert all(c["supercategory"] == DEFAULT_MAPPING[c["name"]] for c in cats)
        assert coco.dataset["info"]["um_per_px"] == 1.0 and coco.dataset["info"]["generator"] == "cyto-edge synth"
        for a in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = a["bbox"]
            im = coco.imgs[a["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
            assert a["iscrowd"] == 0 and abs(a["area"] - w * h) < 0.05
    test = COCO(str(synth_set / "test.json"))
    assert len(test.getAnnIds()) > 0


def test_truth_matches_boxes(synth_set):
    doc = load(synth_set / "train.clean.json")
    test = load(synth_set / "test.json")
    names = {c["id"]: c["name"] for c in doc["categories"]}
    for d in (doc, test):
        per_img: dict[int, list[str]] = {}
        for a in d["annotations"]:
            per_img.setdefault(a["image_id"], []).append(names[a["category_id"]])
        for im in d["images"]:
            t, classes = im["truth"], per_img.get(im["id"], [])
            assert t["fov_grade"] == most_severe([DEFAULT_MAPPING[c] for c in classes if c not in DEFAULT_ORGANISMS])
            assert t["organisms"] == sorted({c for c in classes if c in DEFAULT_ORGANISMS})
            assert 0.0 <= t["focus"] <= 1.0 and t["focus_sigma_px"] == pytest.approx(4.0 * t["focus"], abs=1e-3)
            assert t["nuclei_count"] == sum(t["nuclei"].values()) >= t["nuclei"]["squamous"]
            assert abs(t["nuclei"]["squamous"] - t["squamous_count"]) <= max(2, 0.05 * t["squamous_count"])
            if t["empty"]:
                assert classes == [] and t["squamous_count"] == 0
            if t["kind"] in ("lesion", "nilm"):
                assert t["squamous_count"] >= 5


def test_weak_images_and_csv(synth_set):
    train, clean = load(synth_set / "train.json"), load(synth_set / "train.clean.json")
    weak = [im for im in train["images"] if "image_labels" in im]
    assert len(weak) == round(OPTS.weak_fraction * OPTS.n_train) == 5
    weak_ids = {im["id"] for im in weak}
    assert not [a for a in train["annotations"] if a["image_id"] in weak_ids]
    names = {c["id"]: c["name"] for c in clean["categories"]}
    for im in weak:
        exact = {names[a["category_id"]] for a in clean["annotations"] if a["image_id"] == im["id"]}
        assert im["image_labels"] == [c for c in DEFAULT_CLASSES if c in exact]
    assert [im["weak"] for im in clean["images"]] == ["image_labels" in im for im in train["images"]]
    with open(synth_set / "train_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["file"]: r["labels"] for r in rows} == {im["file_name"]: ";".join(im["image_labels"]) for im in weak}


def test_label_noise_drop_and_jitter(synth_set):
    train, clean = load(synth_set / "train.json"), load(synth_set / "train.clean.json")
    weak_ids = {im["id"] for im in train["images"] if "image_labels" in im}
    exact = [a for a in clean["annotations"] if a["image_id"] not in weak_ids]
    noisy = train["annotations"]
    assert len(exact) >= 8
    assert len(noisy) == len(exact) - round(OPTS.drop * len(exact))
    for a in noisy:  # every noisy box is a moved exact box of the same class and image
        cands = [e for e in exact if e["image_id"] == a["image_id"] and e["category_id"] == a["category_id"]]
        best = max(_iou(e["bbox"], a["bbox"]) for e in cands)
        assert 0.45 <= best < 1.0, (a, cands)
    test = load(synth_set / "test.json")  # test stays exact and complete
    assert all("image_labels" not in im for im in test["images"])


def _iou(a, b):
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0.0, min(ay1, by1) - max(a[1], b[1]))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


def test_label_noise_bounds():
    rng = np.random.default_rng(0)
    boxes = np.array([[100, 100, 140, 160], [300, 200, 330, 220], [50, 400, 150, 480]], np.float64)
    entries = [ImageEntry(f"{i}.jpg", 1000, 1000, boxes.copy(), ["hsil", "agc", "scc"], {}) for i in range(40)]
    entries[0].weak = True
    stats = apply_label_noise(rng, entries, drop=0.2, jitter=0.15)
    assert stats == {"boxes": 117, "dropped": 23, "jittered": 94} and entries[0].noisy is None
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    for e in entries[1:]:
        for b, c in zip(e.noisy, e.noisy_labels):
            k = ["hsil", "agc", "scc"].index(c)
            nw, nh = b[2] - b[0], b[3] - b[1]
            assert abs(nw - w[k]) <= 0.15 * w[k] + 1e-9 and abs(nh - h[k]) <= 0.15 * h[k] + 1e-9
            assert abs((b[0] + b[2]) / 2 - (boxes[k, 0] + boxes[k, 2]) / 2) <= 0.15 * w[k] + 1e-9
            assert abs((b[1] + b[3]) / 2 - (boxes[k, 1] + boxes[k, 3]) / 2) <= 0.15 * h[k] + 1e-9


def test_objects_within_size_limits(synth_set):
    sides = []
    for name in ("train.clean.json", "test.json"):
        for a in load(synth_set / name)["annotations"]:
            sides.append((max(a["bbox"][2:]), min(a["bbox"][2:])))
    sides = np.asarray(sides)
    assert sides[:, 0].max() <= 160 and sides[:, 0].min() >= 10


def test_summary_records_parameters(synth_set):
    s = load(synth_set / "synth.json")
    assert s["options"]["seed"] == 3 and s["options"]["drop"] == 0.25 and s["options"]["weak_fraction"] == 0.5
    assert s["train"]["images"] == 10 and s["label_noise"]["dropped"] == round(0.25 * s["label_noise"]["boxes"])


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_per_seed_and_workers(tmp_path):
    opts = SynthOptions(images=3, size=256, seed=11, drop=0.3, jitter=0.2, weak_fraction=0.5, slide=False)
    generate(tmp_path / "a", opts)
    generate(tmp_path / "b", SynthOptions(**{**opts.to_dict(), "workers": 2}))
    generate(tmp_path / "c", SynthOptions(**{**opts.to_dict(), "seed": 12}))
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert len(a) == 8 and a == b  # byte-identical, whatever the number of worker processes
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != c.get(k) for k in jpgs)


@pytest.mark.parametrize("args, needle", [
    (["--images", "0"], "--images"),
    (["--label-noise", "drop=1.5"], "drop"),
    (["--label-noise", "shift=0.1"], "--label-noise"),
    (["--um-per-px", "0"], "--um-per-px"),
    (["--test-fraction", "1"], "--test-fraction"),
    (["--weak-fraction", "-0.1"], "--weak-fraction"),
    (["--slide-size", "big"], "--slide-size"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, args, needle):
    rc = main(["synth", str(tmp_path / "out"), "--no-slide", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_out_and_json_summary(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    (out / "train").mkdir()
    (out / "train" / "synth_999999.jpg").write_bytes(b"stale")
    assert main(["synth", str(out), "--images", "2", "--no-slide"]) == 2
    assert "not empty" in capsys.readouterr().err
    rc = main(["synth", str(out), "--images", "2", "--size", "256", "--no-slide", "--force", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["train"]["images"] + summary["test"]["images"] == 2
    assert (out / "keep.txt").exists() and not (out / "train" / "synth_999999.jpg").exists()
    assert len(list((out / "train").glob("*.jpg"))) == summary["train"]["images"]
