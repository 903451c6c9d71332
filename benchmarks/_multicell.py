"""Shared by explain_rcan.py, patch_attention.py and pretrain.py: cached synthetic fields and multi-cell
crops of them (cyto_edge/train/multicell.py), and a seeded classifier run."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from _cache import cached


def synth_dir(images: int, size: int, seed: int = 0, um_per_px: float = 1.0, test_fraction: float = 0.25) -> Path:
    """A cached `cyto-edge synth` directory (train and test splits) at `um_per_px`."""
    key = {"what": "synth", "images": images, "size": size, "seed": seed, "test_fraction": test_fraction,
           "um_per_px": um_per_px}

    def build(d: Path) -> None:
        from cyto_edge.cli import main

        rc = main(["synth", str(d / "synth"), "--images", str(images), "--size", str(size), "--seed", str(seed),
                   "--test-fraction", str(test_fraction), "--um-per-px", str(um_per_px), "--no-slide", "--json"])
        if rc:
            raise SystemExit(f"cyto-edge synth failed with exit code {rc}")

    return cached(key, build, kind="data") / "synth"


def crop_sets(root: Path, crop: int, per_image: int, grouping: str):
    """(train, test) CropSets: train crops from the train fields, test crops from the test fields."""
    from cyto_edge.train.data import load_detection
    from cyto_edge.train.multicell import multicell_crops

    train = multicell_crops(load_detection(root, "train"), crop, per_image, seed=0, grouping=grouping)
    test = multicell_crops(load_detection(root, "test"), crop, per_image, seed=1, grouping=grouping)
    return train, test


def run_classifier(build, train, test, *, seed: int, epochs: int, lr: float, batch: int = 32, init=None) -> dict:
    """Build (seeded), optionally initialise from pretrained weights, fit, score on test."""
    from cyto_edge.train.multicell import fit, predict, scores

    torch.manual_seed(seed)
    np.random.seed(seed)
    model = build()
    loaded = None
    if init is not None:
        from cyto_edge.train.pretrain import load_pretrained_backbone

        loaded = len(load_pretrained_backbone(model, init).matched)
    t0 = time.monotonic()
    hist = fit(model, train.images, train.labels, epochs=epochs, lr=lr, batch=batch, seed=seed)
    secs = time.monotonic() - t0
    pred = predict(model, test.images).argmax(1)
    sc = scores(test.labels, pred, test.classes)
    print(f"  seed {seed}: accuracy {sc['accuracy']}, weighted F1 {sc['weighted_f1']}, {secs:.0f} s", file=sys.stderr,
          flush=True)
    return {"model": model, "scores": sc, "train_seconds": round(secs, 1),
            "final_train_loss": hist[-1]["loss"], "params": sum(p.numel() for p in model.parameters()),
            "init_tensors": loaded}


def mean_std(values: list[float]) -> dict:
    a = np.asarray([v for v in values if v is not None], np.float64)
    return {"mean": round(float(a.mean()), 4) if a.size else None, "std": round(float(a.std()), 4) if a.size else None,
            "per_seed": [round(float(v), 4) for v in a]}
