"""RCAN (residual channel attention) classifier vs plain CNN on multi-cell synthetic images, and where
their integrated-gradients explanations point.

Data: `cyto-edge synth` fields (cached), crops of whole multi-cell regions at the fields' scale, each
labelled by the most severe cell it holds (NILM / low-grade / high-grade, balanced; train crops from the
train fields, test crops from the test fields; cyto_edge/train/multicell.py). Models (models/rcan.py):
`rcan` (residual-in-residual + channel attention), `plain` (conv-BN-ReLU stack of the same widths and
depth), and with --archs also `rcan-noca` (RIR without attention). Each over the seeds (default 0,1,2):
test accuracy and weighted F1 (the paper's eq. 1) as mean and std, parameters, training time.

Explanations: integrated gradients (blur baseline, trapezoid) of the true class's probability on the
first --ig-crops abnormal test crops, the same crops for every model: the share of |attribution| inside
the abnormal cells' boxes (against the share of the area those boxes cover) and the completeness
relative error. One JSON line per architecture, and one comparing rcan with plain.

--small: 2 µm/px fields (240 of 384 px), 64 px crops (128 µm), widths 16-32-64, 8 epochs: minutes on 2 cores.
Full: 1 µm/px fields (600 of 768 px), 160 px crops, widths 24-48-96, 2 groups of 2 blocks, 20 epochs.
"""
from __future__ import annotations

import numpy as np
import torch
from _common import emit, parser
from _multicell import crop_sets, mean_std, run_classifier, synth_dir


def settings(small: bool) -> dict:
    if small:
        return dict(images=240, size=384, um=2.0, crop=64, per_image=12, epochs=8, lr=3e-3,
                    arch_kw=dict(widths=(16, 32, 64), groups=1, blocks=2, reduction=4))
    return dict(images=600, size=768, um=1.0, crop=160, per_image=12, epochs=20, lr=2e-3,
                arch_kw=dict(widths=(24, 48, 96), groups=2, blocks=2, reduction=8))


def ig_figures(model, test, idx: list[int], steps: int) -> dict:
    from cyto_edge.train.explain import integrated_gradients, make_baseline, to_chw
    from cyto_edge.train.multicell import MEAN, STD, attribution_in_lesions

    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    model.eval()
    inside, area, rel = [], [], []
    for i in idx:
        c = int(test.labels[i])
        x = to_chw(test.images[i])
        fn = lambda b, c=c: torch.softmax(model((b - m) / s), 1)[:, c]  # noqa: E731
        r = integrated_gradients(fn, x, make_baseline(x, "blur"), steps=steps, method="trapezoid")
        a, frac = attribution_in_lesions(r.attributions, test.lesions[i])
        inside.append(a)
        area.append(frac)
        rel.append(r.relative_error)
    return {"ig_share_in_lesions": round(float(np.mean(inside)), 4), "lesion_area_share": round(float(np.mean(area)), 4),
            "ig_concentration": round(float(np.mean(inside) / max(np.mean(area), 1e-9)), 3),
            "ig_relative_error_median": round(float(np.median(rel)), 5),
            "ig_relative_error_max": round(float(np.max(rel)), 5)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--archs", default="rcan,plain", help="Comma-separated: rcan, plain, rcan-noca.")
    p.add_argument("--ig-crops", type=int, default=None, help="Abnormal test crops explained per model.")
    p.add_argument("--ig-steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine).")
    p.add_argument("--save", default=None, help="Write each architecture's seed-0 checkpoint into this folder.")
    p.set_defaults(seeds=[0, 1, 2])
    args = p.parse_args()
    from cyto_edge.train.models.rcan import build_classifier, save_checkpoint
    from cyto_edge.train.multicell import MEAN, STD

    torch.set_num_threads(args.threads)
    st = settings(args.small)
    root = synth_dir(st["images"], st["size"], seed=0, um_per_px=st["um"])
    train, test = crop_sets(root, st["crop"], st["per_image"], "grade3")
    n_ig = args.ig_crops or (8 if args.small else 24)
    ig_idx = [i for i in range(len(test.labels)) if test.labels[i] > 0 and len(test.lesions[i])][:n_ig]
    data = {"train_crops": train.counts(), "test_crops": test.counts(), "classes": train.classes,
            "crop_px": st["crop"], "um_per_px": st["um"], "fields": st["images"], "epochs": st["epochs"]}
    results = {}
    for arch in args.archs.split(","):
        runs = []
        for seed in args.seeds:
            r = run_classifier(lambda: build_classifier(arch, len(train.classes), **st["arch_kw"]), train, test,
                               seed=seed, epochs=st["epochs"], lr=st["lr"])
            r["ig"] = ig_figures(r["model"], test, ig_idx, args.ig_steps)
            if args.save and seed == args.seeds[0]:
                save_checkpoint(f"{args.save}/{arch}.pt", r["model"], arch=arch, arch_kwargs=st["arch_kw"],
                                classes=train.classes, mean=MEAN, std=STD, input_size=(st["crop"], st["crop"]),
                                um_per_px=st["um"], extra={"benchmark": "explain_rcan", "scores": r["scores"]})
            runs.append(r)
        fig = {"accuracy": mean_std([r["scores"]["accuracy"] for r in runs]),
               "weighted_f1": mean_std([r["scores"]["weighted_f1"] for r in runs]),
               "f1_per_class_seed0": runs[0]["scores"]["f1"], "params": runs[0]["params"],
               "train_seconds": mean_std([r["train_seconds"] for r in runs])["mean"]}
        for k in ("ig_share_in_lesions", "ig_concentration", "ig_relative_error_median"):
            fig[k] = mean_std([r["ig"][k] for r in runs])
        fig["lesion_area_share"] = runs[0]["ig"]["lesion_area_share"]
        results[arch] = fig
        emit("explain_rcan", fig, torch_threads=args.threads, arch=arch, arch_kw=st["arch_kw"], seeds=args.seeds,
             ig_crops=len(ig_idx), ig_steps=args.ig_steps, data=data)
    if "rcan" in results and "plain" in results:
        a, b = results["rcan"], results["plain"]
        emit("explain_rcan_vs_plain", {
            "accuracy_diff": round(a["accuracy"]["mean"] - b["accuracy"]["mean"], 4),
            "weighted_f1_diff": round(a["weighted_f1"]["mean"] - b["weighted_f1"]["mean"], 4),
            "ig_concentration_rcan": a["ig_concentration"]["mean"], "ig_concentration_plain": b["ig_concentration"]["mean"]},
            torch_threads=args.threads, seeds=args.seeds, data=data)


if __name__ == "__main__":
    main()
