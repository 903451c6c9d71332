"""Detector mAP with and without jigsaw pretraining of its backbone when only 10% of the images are labelled.

Data: `cyto-edge synth` fields (cached). The unlabeled set is every train field (used as frames, no
labels); the labelled set is a random 10% of the train fields (a different draw per seed, the same for
both arms); mAP@0.5 and mAP@[.5:.95] on the whole test split, tiled as on the device (train/evaluate.py).
Arms over the seeds (default 0,1,2), identical recipes (the shipped `tiny` recipe, no validation split):
- `scratch`: random initialisation;
- `jigsaw`: backbone from `cyto-edge pretrain --arch <model>` on the unlabeled fields, loaded through the
  train loop's `model.init` (i.e. `cyto-edge train tiny --set model.init=pretrained.pt`), pretrained
  once and shared by all seeds.

--small: 160 fields of 512 px (120 train, 12 labelled), the `tiny` detector, 120 steps of batch 16,
90 s of pretraining (24 permutations, 96 px cells). Full: 400 fields of 1024 px, 1200 steps, 15 minutes
of pretraining (100 permutations).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import emit, parser
from _multicell import mean_std, synth_dir


def settings(small: bool) -> dict:
    if small:
        return dict(images=160, size=512, model="tiny", epochs=6, steps=20, ssl_seconds=90, cell=96, perms=24)
    return dict(images=400, size=1024, model="tiny", epochs=20, steps=60, ssl_seconds=900, cell=96, perms=100)


def labelled_subset(root: Path, fraction: float, seed: int, out: Path) -> tuple[Path, int]:
    """A dataset folder whose train.json keeps `fraction` of the train images (train/ and test/ linked)."""
    d = json.loads((root / "train.json").read_text())
    rng = np.random.default_rng(seed)
    n = max(1, round(fraction * len(d["images"])))
    keep = {d["images"][i]["id"] for i in rng.choice(len(d["images"]), n, replace=False)}
    d["images"] = [im for im in d["images"] if im["id"] in keep]
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] in keep]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(d))
    (out / "test.json").write_text((root / "test.json").read_text())
    for sub in ("train", "test"):
        if not (out / sub).exists():
            os.symlink(root / sub, out / sub)
    return out, n


def pretrain_backbone(root: Path, st: dict, out: Path) -> dict:
    from cyto_edge.train.models.jigsaw import hamming_permutations
    from cyto_edge.train.pretrain import (PretrainConfig, PuzzleSpec, jigsaw_accuracy, pretrain, save_pretrained,
                                          scan_frames)

    spec = PuzzleSpec(cell=st["cell"], tile=round(st["cell"] * 7 / 8))
    frames = scan_frames(root / "train", spec.crop).usable
    cfg = PretrainConfig(arch=st["model"], epochs=1000, num_perms=st["perms"], per_image=8, batch_size=32, lr=2e-3,
                         puzzle=spec, time_budget_s=st["ssl_seconds"])
    net, stats = pretrain(frames, cfg)
    save_pretrained(out, net, cfg, stats)
    h = stats["history"]
    test_frames = scan_frames(root / "test", spec.crop).usable
    acc = jigsaw_accuracy(net, test_frames, spec, hamming_permutations(cfg.num_perms, cfg.seed), n=256)
    return {"frames": len(frames), "test_frame_accuracy": round(acc, 4), "permutations": cfg.num_perms,
            "epochs": len(h), "final_loss": h[-1]["loss"], "final_accuracy": h[-1]["accuracy"],
            "chance": stats["chance"], "seconds": stats["seconds"]}


def train_and_eval(data: Path, st: dict, seed: int, init: Path | None, out: Path, threads: int) -> dict:
    from cyto_edge.train.checkpoint import load_checkpoint, model_from_checkpoint
    from cyto_edge.train.config import load_config
    from cyto_edge.train.data import load_detection
    from cyto_edge.train.evaluate import evaluate_model
    from cyto_edge.train.loop import Trainer

    sets = [f"data.root={data}", "data.val_fraction=0", f"schedule.epochs={st['epochs']}",
            f"schedule.steps_per_epoch={st['steps']}", f"seed={seed}", f"out_dir={out}", "tensorboard=false",
            f"threads={threads}", "workers=0", f"model.name={st['model']}", f"name={'jigsaw' if init else 'scratch'}-{seed}"]
    if init is not None:
        sets.append(f"model.init={init}")
    t0 = time.monotonic()
    res = Trainer(load_config("tiny", sets)).run()
    secs = time.monotonic() - t0
    ck = load_checkpoint(res["last"])
    model = model_from_checkpoint(ck)
    test = load_detection(data, "test")
    norm = ck["normalization"]
    metrics, _ = evaluate_model(model, test, model_um_per_px=ck.get("um_per_px"), overlap=160,
                                mean=norm["mean"], std=norm["std"])
    return {"map50": float(metrics.map50 or 0.0), "map": float(metrics.map or 0.0), "train_seconds": round(secs, 1),
            "command": "cyto-edge train tiny " + " ".join(f"--set {s}" for s in sets)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--fraction", type=float, default=0.1, help="Fraction of train images with labels.")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine).")
    p.set_defaults(seeds=[0, 1, 2])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    st = settings(args.small)
    root = synth_dir(st["images"], st["size"], seed=0, um_per_px=1.0)
    tmp = Path(tempfile.mkdtemp(prefix="pretrain-bench-"))
    ssl = pretrain_backbone(root, st, tmp / "pretrained.pt")
    runs: dict[str, list] = {"scratch": [], "jigsaw": []}
    for seed in args.seeds:
        data, n_lab = labelled_subset(root, args.fraction, seed, tmp / f"data-{seed}")
        runs["scratch"].append(train_and_eval(data, st, seed, None, tmp / "runs", args.threads))
        runs["jigsaw"].append(train_and_eval(data, st, seed, tmp / "pretrained.pt", tmp / "runs", args.threads))
    info = {"fields": st["images"], "field_px": st["size"], "labelled_fraction": args.fraction, "labelled_images": n_lab,
            "model": st["model"], "steps": st["epochs"] * st["steps"], "pretraining": ssl}
    for arm, rs in runs.items():
        emit("pretrain_detector", {"map50": mean_std([r["map50"] for r in rs]), "map": mean_std([r["map"] for r in rs]),
                                   "train_seconds": mean_std([r["train_seconds"] for r in rs])["mean"]},
             torch_threads=args.threads, arm=arm, seeds=args.seeds, train_command=rs[0]["command"], **info)
    emit("pretrain_detector_diff", {"map50_diff": round(float(np.mean([r["map50"] for r in runs["jigsaw"]])
                                                              - np.mean([r["map50"] for r in runs["scratch"]])), 4)},
         torch_threads=args.threads, seeds=args.seeds, **info)


if __name__ == "__main__":
    main()
