"""Our SSDLite student against torchvision's reference SSDlite320-MobileNetV3, on the same crops.

    python benchmarks/reference_ssdlite.py --minutes 8          # 8 minutes of training each, 400 fields
    python benchmarks/reference_ssdlite.py --small              # 1.5 minutes each, 100 fields (run_all)

Both train from random weights for the same wall-clock budget on the same stream of crops (the trainer's
CropDataset: the recipe's augmentation, 60% of crops centred on a labelled object), with the same
optimiser (AdamW, the student_cpu recipe's learning rate and weight decay, linear warm-up, cosine decay
over the budget, gradient clipping 10, no EMA):
  ours       cyto-edge's ssdlite320_mobilenetv3 (width 1.0, stride-8 finest level), our MultiBox loss, through
             Trainer.train_step (the code `cyto-edge train` runs);
  reference  torchvision.models.detection.ssdlite320_mobilenet_v3_large with its own loss and matcher.
Both are evaluated on the same fixed crops of the clean test split (80% centred on an object, no
augmentation) with the runtime's metric (runtime/metrics.py), class-aware mAP@0.5 and class-agnostic AP@0.5.

It answers one question: does our model + loss + training step learn as fast per second as the
reference implementation on this data? (It does not measure full-field, tiled accuracy: `cyto-edge eval`.)
"""
from __future__ import annotations

import math
import shutil
import tempfile
import time

import numpy as np
from _common import emit, parser
from _detection import clean_synth

EVAL_CROPS = 300


def settings(small: bool) -> dict:
    return dict(images=100, size=512, test_fraction=0.3, minutes=1.5) if small else \
        dict(images=400, size=1024, test_fraction=0.2, minutes=8.0)


def val_crops(test, seed: int):
    from cyto_edge.train.data.torch_data import AugConfig, CropDataset

    plain = AugConfig(flip=False, rot90=False, hue=0, saturation=0, value=0, gamma=0, blur_p=0, noise_p=0,
                      scale=(1.0, 1.0), pos_fraction=0.8)
    ds = CropDataset(test, 320, None, EVAL_CROPS, seed=1000 + seed, aug=plain)
    items = [ds[i] for i in range(len(ds))]
    gts = []
    for v in items:
        lab = v["labels"].numpy()
        gts.append({"boxes": v["boxes"].numpy()[lab >= 0] * 320, "labels": lab[lab >= 0]})
    return items, gts


def score(gts, preds, classes) -> dict:
    from cyto_edge.runtime.metrics import evaluate_detections

    m = evaluate_detections(gts, preds, classes)
    agn = evaluate_detections([{"boxes": g["boxes"], "labels": g["labels"] * 0} for g in gts],
                              [{**p, "labels": p["labels"] * 0} for p in preds], ["object"])
    return {"map50": round(m.map50 or 0.0, 4), "agnostic_ap50": round(agn.map50 or 0.0, 4)}


def run(which: str, data, seed: int, minutes: float, threads: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from cyto_edge.runtime.decode import PostProcess, postprocess
    from cyto_edge.train.config import load_config
    from cyto_edge.train.data.load import load_detection
    from cyto_edge.train.data.torch_data import collate
    from cyto_edge.train.loop import Trainer
    from cyto_edge.train.utils import param_groups

    torch.manual_seed(seed)
    tmp = tempfile.mkdtemp(prefix="refssd-")
    cfg = load_config("student_cpu", [f"data.root={data}", f"out_dir={tmp}", "name=ours", f"seed={seed}",
                                      "model.kwargs.width_mult=1.0", "optim.ema_decay=null", "tensorboard=false",
                                      "data.val_fraction=0", "workers=0", f"threads={threads}", "schedule.epochs=1",
                                      "schedule.steps_per_epoch=1000000"])
    tr = Trainer(cfg)
    tr.setup()
    classes = list(tr.full.classes)
    items, gts = val_crops(load_detection(data, split="test"), seed)
    lr, budget = cfg.optim.lr, minutes * 60
    if which == "reference":
        from torchvision.models.detection import ssdlite320_mobilenet_v3_large

        model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=len(classes) + 1,
                                              image_mean=[0.0] * 3, image_std=[1.0] * 3)  # crops come normalized
        opt = torch.optim.AdamW(param_groups([model], cfg.optim.weight_decay), lr=lr)
    else:
        model = tr.model
    params = sum(p.numel() for p in model.parameters())
    loader = DataLoader(tr.crops, batch_size=cfg.optim.batch_size, collate_fn=collate, num_workers=0)
    model.train()
    t0, steps, last = time.perf_counter(), 0, float("nan")
    for batch in loader:
        el = time.perf_counter() - t0
        if el >= budget:
            break
        if which == "reference":
            f = min(1.0, (steps + 1) / cfg.optim.warmup_steps) * 0.5 * (1 + math.cos(math.pi * el / budget))
            for g in opt.param_groups:
                g["lr"] = lr * f
            keep = [i for i in range(len(batch["image"])) if bool(batch["valid"][i].any())]
            targets = [{"boxes": batch["boxes"][i][batch["valid"][i]] * 320,
                        "labels": batch["labels"][i][batch["valid"][i]] + 1} for i in keep]
            if not keep:
                continue
            loss = sum(model([batch["image"][i] for i in keep], targets).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            last = float(loss.detach())
        else:  # cosine over the time budget: the trainer's schedule length follows the measured pace
            tr.cfg.schedule.steps_per_epoch = max(steps + 2, int(steps * budget / max(el, 1e-3)))
            last = tr.train_step(batch)["total"]
        steps += 1
    train_s = time.perf_counter() - t0
    shutil.rmtree(tmp, ignore_errors=True)              # nothing of the run is kept: the figures are the result
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(items), 32):
            x = torch.stack([v["image"] for v in items[i:i + 32]])
            if which == "reference":
                for o in model(list(x)):
                    preds.append({"boxes": o["boxes"].numpy(), "scores": o["scores"].numpy(),
                                  "labels": o["labels"].numpy() - 1})
            else:
                pri = tr.model.priors_numpy()
                for lo, lg in zip(*(t.numpy() for t in model(x))):
                    d = postprocess(lo, lg, pri, tr.model.variances, (320, 320), PostProcess(score_threshold=0.01))
                    preds.append({"boxes": d.boxes, "scores": d.scores, "labels": d.labels})
    return {"steps": steps, "train_s": round(train_s, 1), "crops_per_s": round(steps * cfg.optim.batch_size / train_s, 2),
            "params_m": round(params / 1e6, 3), "final_loss": round(last, 4), "val_crops": len(items),
            "val_boxes": int(sum(len(g["labels"]) for g in gts)), **score(gts, preds, classes)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=None, help="Training budget of each model (default: 8, --small 1.5).")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    st = settings(args.small)
    minutes = args.minutes or st["minutes"]
    data = clean_synth(st)
    rows = {}
    for seed in args.seeds:
        for which in ("ours", "reference"):
            r = run(which, data, seed, minutes, args.threads)
            rows.setdefault(which, []).append(r)
            emit("reference_ssdlite", {"model": which, "seed": seed, "minutes": minutes, **r},
                 torch_threads=args.threads, images=st["images"], size=st["size"])
    m = {w: float(np.mean([r["map50"] for r in v])) for w, v in rows.items()}
    emit("reference_ssdlite", {"summary": True, "minutes": minutes, "seeds": list(args.seeds),
                               "map50_ours": round(m["ours"], 4), "map50_reference": round(m["reference"], 4),
                               "ours_crops_per_s_over_reference": round(
                                   np.mean([r["crops_per_s"] for r in rows["ours"]])
                                   / np.mean([r["crops_per_s"] for r in rows["reference"]]), 3)},
         torch_threads=args.threads)


if __name__ == "__main__":
    main()
