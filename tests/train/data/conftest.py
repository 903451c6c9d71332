"""Builders of small datasets on disk (images written by OpenCV) in each supported layout."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from cyto_edge.cli import main


def write_image(path: Path, w: int, h: int, seed: int = 0) -> Path:
    """A small textured BGR image of w x h pixels."""
    rng = np.random.default_rng(seed)
    im = rng.integers(120, 230, (h, w, 3), dtype=np.uint8)
    cv2.circle(im, (w // 2, h // 2), min(w, h) // 4, (120, 60, 140), -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), im)
    return path


# (width, height) cycle: images of varying size.
SIZES = [(200, 150), (160, 120), (240, 180)]
# Category ids deliberately not in model order, names spelled as in other tools (aliases).
CATEGORIES = [{"id": 7, "name": "trich"}, {"id": 3, "name": "ASC-US"}, {"id": 12, "name": "LSIL"},
              {"id": 5, "name": "hsil"}]


def coco_dict(root: Path, split: str, n: int, str_ids: bool = False, seed: int = 0) -> dict:
    """A COCO dict for `n` images written under root/split/, 1-3 boxes each, with synth's extensions."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    aid = 100
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        name = f"{split}_{i:03d}.png"
        write_image(root / split / name, w, h, seed=i)
        iid = f"img-{split}-{i}" if str_ids else 1000 + i
        images.append({"id": iid, "file_name": name, "width": w, "height": h,
                       "truth": {"fov_grade": ["NILM", "LSIL", "ASC-US"][i % 3], "squamous_count": 30 + i,
                                 "focus": 0.9}})
        for k in range(1 + i % 3):
            cat = CATEGORIES[(i + k) % len(CATEGORIES)]
            bw, bh = float(rng.integers(10, 40)), float(rng.integers(10, 40))
            x, y = float(rng.integers(0, w - 41)), float(rng.integers(0, h - 41))
            aid += 1
            anns.append({"id": aid, "image_id": iid, "category_id": cat["id"], "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
    return {"info": {"um_per_px": 0.5}, "images": images, "annotations": anns, "categories": list(CATEGORIES)}


def write_json(path: Path, d) -> Path:
    path.write_text(json.dumps(d))
    return path


@pytest.fixture
def coco_root(tmp_path) -> Path:
    """CDetector layout: train.json (12 images, a degenerate box, 2 weak images) + train_labels.csv
    (2 more weak images) and test.json (4 images)."""
    root = tmp_path / "cdet"
    train = coco_dict(root, "train", 12)
    train["annotations"].append({"id": 999, "image_id": 1000, "category_id": 12, "bbox": [5, 5, 0.5, 20]})
    for i, labels in ((20, ["lsil", "Trichomonas vaginalis"]), (21, [])):
        name = f"weak_{i}.png"
        write_image(root / "train" / name, 180, 140, seed=i)
        train["images"].append({"id": 1000 + i, "file_name": name, "width": 180, "height": 140,
                                "image_labels": labels})
    write_json(root / "train.json", train)
    write_image(root / "train" / "csvweak_a.png", 150, 100, seed=30)
    write_image(root / "train" / "csvweak_b.jpg", 130, 90, seed=31)
    (root / "train_labels.csv").write_text("file,labels\ncsvweak_a.png,hsil;ASC-US\ncsvweak_b.jpg,trich | lsil\n")
    write_json(root / "test.json", coco_dict(root, "test", 4, seed=1))
    return root


@pytest.fixture
def build():
    """The builders above, for test modules (which cannot import conftest)."""
    return SimpleNamespace(write_image=write_image, coco_dict=coco_dict, write_json=write_json)


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    def run(*args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


@pytest.fixture
def run_json(run_cli):
    def run(*args) -> dict:
        code, out, err = run_cli(*args, "--json")
        assert code == 0, err
        return json.loads(out)
    return run
