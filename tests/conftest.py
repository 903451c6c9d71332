"""Shared fixtures and skip helpers.

Hardware markers (gpu, jetson, picamera) skip with the reason. System tools the tests need (chromium,
ffmpeg) skip when absent on a development machine, but fail in CI, where CYTO_EDGE_REQUIRE_SYSTEM=1
and `.ci/run` has installed them.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def require_binary(name: str, *alternatives: str) -> str:
    for n in (name, *alternatives):
        p = shutil.which(n)
        if p:
            return p
    msg = f"{name} is not installed (apt-get install {name})"
    if os.environ.get("CYTO_EDGE_REQUIRE_SYSTEM") == "1":
        pytest.fail(msg + " but CYTO_EDGE_REQUIRE_SYSTEM=1")
    pytest.skip(msg)


def require_module(name: str, extra: str):
    try:
        return __import__(name)
    except ImportError:
        if os.environ.get("CYTO_EDGE_REQUIRE_SYSTEM") == "1":
            pytest.fail(f"{name} missing (pip install 'cyto-edge[{extra}]')")
        pytest.skip(f"{name} missing (pip install 'cyto-edge[{extra}]')")


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A per-session cache for expensive artefacts (synth sets, trained tiny models)."""
    d = os.environ.get("CYTO_EDGE_TEST_CACHE")
    if d:
        p = Path(d)
        p.mkdir(parents=True, exist_ok=True)
        return p
    return tmp_path_factory.mktemp("cache")


def make_toy_coco(root: Path, n_train: int = 12, n_test: int = 3, size: int = 256, seed: int = 0) -> Path:
    """A small COCO set in the CDetector layout: 3 classes of flat ellipses on a pale background.

    For the mechanics of training (resume, DDP, NaN guard); learning on realistic fields is tested on
    `cyto-edge synth` data.
    """
    import json

    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    cats = [{"id": 1, "name": "hsil"}, {"id": 2, "name": "trichomonas"}, {"id": 3, "name": "candida"}]
    colours = [(140, 60, 120), (120, 140, 90), (200, 90, 60)]  # BGR
    radius = [16, 9, 26]
    for split, n in (("train", n_train), ("test", n_test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            img = np.full((size, size, 3), (225, 220, 230), np.uint8)
            for _ in range(int(rng.integers(2, 5))):
                c = int(rng.integers(0, 3))
                r = radius[c] * rng.uniform(0.85, 1.15)
                cx, cy = rng.uniform(r + 2, size - r - 2, 2)
                cv2.ellipse(img, (int(cx), int(cy)), (int(r), int(r * 0.7)), 0, 0, 360, colours[c], -1)
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c + 1, "iscrowd": 0,
                             "bbox": [cx - r, cy - r * 0.7, 2 * r, 1.4 * r], "area": 2.8 * r * r})
            cv2.imwrite(str(root / split / f"{i}.jpg"), img)
            images.append({"id": i, "file_name": f"{i}.jpg", "width": size, "height": size})
        (root / f"{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": cats, "info": {"um_per_px": 1.0}}))
    return root


@pytest.fixture
def toy_coco(tmp_path) -> Path:
    return make_toy_coco(tmp_path / "toy")


# ----------------------------------------------------------------------------- shared trained artefacts

def make_synth(out: Path, images: int = 16, size: int = 512, seed: int = 3, **kw) -> Path:
    from cyto_edge.synth.options import SynthOptions
    from cyto_edge.synth.writer import generate

    if not (out / "synth.json").exists():
        generate(out, SynthOptions(images=images, size=size, seed=seed, slide=False, **kw))
    return out


@pytest.fixture(scope="session")
def synth_small(cache_dir) -> Path:
    """16 synthetic 512² fields (13 train / 3 test), clean labels."""
    return make_synth(cache_dir / "synth_small")


@pytest.fixture(scope="session")
def tiny_checkpoint(cache_dir, synth_small) -> Path:
    """A `tiny` detector trained briefly on synth_small (shared by export and runtime tests). It starts from
    torchvision's zero classification bias, not the shipped background prior: after 80 steps that leaves
    plenty of scored boxes on every frame for the engines, calibration, store and pages to carry."""
    out = cache_dir / "runs"
    ck = out / "tiny_fixture" / "best.pt"
    if not ck.exists():
        from cyto_edge.train.config import load_config
        from cyto_edge.train.loop import Trainer

        cfg = load_config("tiny", [f"data.root={synth_small}", f"out_dir={out}", "name=tiny_fixture", "workers=0",
                                   "tensorboard=false", "schedule.epochs=2", "schedule.steps_per_epoch=40",
                                   "optim.batch_size=8", "data.val_fraction=0.2", "threads=2",
                                   "model.kwargs.background_prior=null"])
        Trainer(cfg).run()
    return ck


@pytest.fixture(scope="session")
def tiny_bundle(cache_dir, tiny_checkpoint) -> Path:
    """An fp32 bundle of tiny_checkpoint (no gate; tests of the gate live with export)."""
    b = cache_dir / "tiny_fp32.cytobundle"
    if not (b / "manifest.json").exists():
        from cyto_edge.export.bundle_writer import export_fp32_bundle

        export_fp32_bundle(tiny_checkpoint, b)
    return b
