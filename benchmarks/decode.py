"""Decoder cost per image: cyto_edge.runtime.decode.postprocess on SSDlite320-like raw outputs.

The head outputs are synthetic but shaped like the real model's: 3234 priors (20², 10², 5², 3², 2², 1²
maps x 6 anchors at 320x320), 11 classes + background, background confident everywhere except on
20-50 priors per image whose foreground score passes the threshold (a busy Pap field). Reports ms per
image (p50/p95), and the mean number of candidates above the threshold and detections after NMS.
"""
from __future__ import annotations

import numpy as np
from _common import emit, parser, timer

from cyto_edge.runtime.decode import PostProcess, postprocess, softmax
from cyto_edge.runtime.priors import VARIANCES, PriorSpec, make_priors

INPUT = (320, 320)
FEATURES = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
NUM_CLASSES = 11


def fake_outputs(rng: np.random.Generator, num_priors: int, lo: int = 20, hi: int = 50):
    """One image's raw head outputs: loc (P, 4) offsets, logits (P, C+1) with ~lo..hi positives."""
    loc = rng.normal(0.0, 0.5, (num_priors, 4)).astype(np.float32)
    logits = rng.normal(0.0, 1.0, (num_priors, NUM_CLASSES + 1)).astype(np.float32)
    logits[:, 0] = rng.normal(8.0, 0.5, num_priors)                 # background wins by e^8
    pos = rng.choice(num_priors, rng.integers(lo, hi + 1), replace=False)
    cls = rng.integers(1, NUM_CLASSES + 1, pos.size)
    logits[pos, cls] = logits[pos, 0] + rng.uniform(-2.0, 3.0, pos.size)  # p(class) ~ 0.12 .. 0.95
    return loc, logits


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    priors = make_priors(PriorSpec(INPUT, FEATURES))                  # (3234, 4) cx, cy, w, h normalized
    cfg = PostProcess()
    n_images, iters = (32, 300) if args.small else (256, 3000)
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        batch = [fake_outputs(rng, len(priors)) for _ in range(n_images)]
        cands = [int((softmax(lg)[:, 1:] >= cfg.score_threshold).sum()) for _, lg in batch]
        dets = [len(postprocess(lc, lg, priors, VARIANCES, INPUT, cfg)) for lc, lg in batch]
        i = iter(range(1 << 62))

        def one():
            loc, logits = batch[next(i) % n_images]
            postprocess(loc, logits, priors, VARIANCES, INPUT, cfg)

        t = timer(one, warmup=20, iters=iters)
        emit("decode", {**t.figures("ms_per_image"), "candidates_mean": round(float(np.mean(cands)), 1),
                        "detections_mean": round(float(np.mean(dets)), 1)},
             seed=seed, priors=len(priors), classes=NUM_CLASSES, input=list(INPUT), images=n_images,
             iters=t.iters, score_threshold=cfg.score_threshold, nms_iou=cfg.nms_iou)


if __name__ == "__main__":
    main()
