"""Cell-classifier ablation on synthetic crops: the rows of the attention-fusion paper's Table I.

Data: `cyto-edge synth` fields (cached); crops cut around every labelled box (context 0.25, the
`train-classifier --from-detection` path) plus one 'normal' crop per image away from the boxes; trained on
the train split, tested on the test split. Rows: ResNet (no attention), +SE, +SAM, +DNL, +SE+SAM, and all
three; each row over the seeds (default 0,1,2): test accuracy and macro F1 as mean and std, parameters,
training seconds. --small: the `small` architecture at width 8 on 32 px crops of 800 fields of 512 px,
30 epochs (a few minutes of CPU on 2 cores; synth once, cached). Full: resnet50 on 80 px crops (the paper's size) of 1000 fields.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from _cache import cached
from _common import emit, parser

ROWS = {"resnet": dict(se=False, sam=False, dnl=False), "se": dict(se=True, sam=False, dnl=False),
        "sam": dict(se=False, sam=True, dnl=False), "dnl": dict(se=False, sam=False, dnl=True),
        "se+sam": dict(se=True, sam=True, dnl=False), "se+sam+dnl": dict(se=True, sam=True, dnl=True)}


def synth_set(images: int, size: int, seed: int = 0):
    """A cached `cyto-edge synth` directory (train and test splits)."""
    key = {"what": "synth", "images": images, "size": size, "seed": seed, "test_fraction": 0.25}

    def build(d):
        import contextlib
        import sys

        from cyto_edge.cli import main

        with contextlib.redirect_stdout(sys.stderr):                     # keep stdout for result lines
            rc = main(["synth", str(d / "synth"), "--images", str(images), "--size", str(size), "--seed", str(seed),
                       "--test-fraction", "0.25", "--no-slide", "--workers", "2", "--json"])
        if rc:
            raise SystemExit(f"cyto-edge synth failed with exit code {rc}")

    return cached(key, build, kind="data") / "synth"


def crop_sets(root, img_size: int):
    from cyto_edge.train.cellcrops import CropSpec, from_detection
    from cyto_edge.train.data.load import load_detection

    spec = CropSpec(context=0.25)
    train = from_detection(load_detection(root, "train"), img_size, spec, background_per_image=1, seed=0)
    test = from_detection(load_detection(root, "test"), img_size, spec, background_per_image=1, seed=1)
    keep = [c for c in test.classes if c in train.classes]
    idx = np.flatnonzero(np.isin(np.asarray(test.classes)[test.labels], keep))   # test classes seen in training
    test_labels = np.asarray([train.classes.index(test.classes[k]) for k in test.labels[idx]], np.int64)
    return train, test.images[idx], test_labels


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    from cyto_edge.train.classify import ClassifierSettings, build, fit, predict, report

    torch.set_num_threads(2)
    if args.small:
        images, size, arch, width, img, epochs = 800, 512, "small", 8, 32, 30
    else:
        images, size, arch, width, img, epochs = 1000, 1024, "resnet50", None, 80, 30
    train, test_x, test_y = crop_sets(synth_set(images, size), img)
    for row, flags in ROWS.items():
        accs, f1s, secs, n_params = [], [], [], 0
        for seed in args.seeds:
            s = ClassifierSettings(arch=arch, width=width, img_size=img, epochs=epochs, batch=64, lr=3e-3,
                                   val_fraction=0.0, seed=seed, **flags)
            torch.manual_seed(seed)
            model = build(s, len(train.classes))
            n_params = sum(p.numel() for p in model.parameters())
            t0 = time.perf_counter()
            model, _ = fit(model, train.images, train.labels, s)
            secs.append(time.perf_counter() - t0)
            rep = report(test_y, predict(model, test_x).argmax(1), train.classes)
            accs.append(rep["accuracy"])
            f1s.append(rep["macro_f1"])
        emit("classifier", {"accuracy_mean": round(float(np.mean(accs)), 4), "accuracy_std": round(float(np.std(accs)), 4),
                            "macro_f1_mean": round(float(np.mean(f1s)), 4), "macro_f1_std": round(float(np.std(f1s)), 4),
                            "params": n_params, "train_s_mean": round(float(np.mean(secs)), 1)},
             row=row, **flags, seeds=args.seeds, accuracy=accs, arch=arch, width=width, img_size=img, epochs=epochs,
             classes=len(train.classes), train_crops=len(train), test_crops=len(test_y), synth_images=images,
             synth_size=size, torch_threads=2)


if __name__ == "__main__":
    main()
