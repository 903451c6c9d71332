"""Image-level classification (NILM vs abnormal) with and without patch attention, and with jigsaw
pretraining of the shared patch trunk (the paper's SSL + AL).

Data: `cyto-edge synth` fields (cached); crops of 3 x 3 patches at the fields' scale labelled NILM or
abnormal (any cell above NILM inside; balanced; train crops from the train fields, test crops from the
test fields). Model (models/jigsaw.py PatchAttentionClassifier): nine patches through one shared trunk
(the `plain` CNN), per-patch FC, concatenation, FC. Arms over the seeds (default 0,1,2):
- `no-attention`;  - `attention` (GAP + FC + sigmoid patch weights);
- `attention+jigsaw`: the trunk first pretrained by `cyto_edge.train.pretrain` on the train fields used as
  unlabeled frames (the puzzles' cell = the patch size), once, shared by all seeds (skip with --no-ssl).
Figures per arm: test accuracy and weighted F1 (mean, std), and on abnormal test crops the mean patch
weight of patches that hold an abnormal cell vs those that do not (where the attention looks).

--small: 2 µm/px fields (240 of 384 px), 32 px patches (96 px crops), 8 epochs, 60 s of pretraining
(24 permutations). Full: 1 µm/px fields (600 of 768 px), 64 px patches, 20 epochs, 10 minutes of
pretraining (100 permutations). The pretext accuracy reached is reported with the arm: transfer can
only help once it is well above chance.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import emit, parser
from _multicell import crop_sets, mean_std, run_classifier, synth_dir


def settings(small: bool) -> dict:
    if small:
        return dict(images=240, size=384, um=2.0, patch=32, per_image=12, epochs=8, lr=3e-3, ssl_seconds=60, perms=24,
                    trunk=dict(widths=(8, 16, 32), groups=1, blocks=1))
    return dict(images=600, size=768, um=1.0, patch=64, per_image=12, epochs=20, lr=2e-3, ssl_seconds=600, perms=100,
                trunk=dict(widths=(16, 32, 64), groups=1, blocks=2))


def patch_weight_figures(model, test) -> dict:
    """Mean attention weight of lesion patches vs other patches over abnormal test crops."""
    from cyto_edge.train.multicell import to_input

    idx = [i for i in range(len(test.labels)) if test.labels[i] == 1 and len(test.lesions[i])]
    if not idx or model.attention is None:
        return {}
    model.eval()
    with torch.no_grad():
        model(to_input(test.images[idx]))
    w = model.last_patch_weights.numpy()           # (n, 9)
    S = test.images.shape[1]
    p = S // 3
    hit, miss = [], []
    for row, i in zip(w, idx):
        centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in test.lesions[i]]
        cells = {min(int(cy // p), 2) * 3 + min(int(cx // p), 2) for cx, cy in centres}
        for k in range(9):
            (hit if k in cells else miss).append(float(row[k]))
    return {"patch_weight_lesion": round(float(np.mean(hit)), 4), "patch_weight_other": round(float(np.mean(miss)), 4)}


def pretrain_trunk(root: Path, st: dict, out: Path) -> dict:
    from cyto_edge.train.models.jigsaw import hamming_permutations
    from cyto_edge.train.pretrain import (PretrainConfig, PuzzleSpec, jigsaw_accuracy, pretrain, save_pretrained,
                                          scan_frames)

    spec = PuzzleSpec(cell=st["patch"], tile=round(st["patch"] * 7 / 8))
    frames = scan_frames(root / "train", spec.crop).usable
    cfg = PretrainConfig(arch="plain", trunk_kwargs=dict(st["trunk"]), epochs=1000, num_perms=st["perms"], per_image=8,
                         batch_size=32, lr=2e-3, puzzle=spec, time_budget_s=st["ssl_seconds"])
    net, stats = pretrain(frames, cfg)
    save_pretrained(out, net, cfg, stats)
    h = stats["history"]
    test_frames = scan_frames(root / "test", spec.crop).usable
    acc = jigsaw_accuracy(net, test_frames, spec, hamming_permutations(cfg.num_perms, cfg.seed), n=256)
    return {"frames": len(frames), "test_frame_accuracy": round(acc, 4), "permutations": cfg.num_perms,
            "epochs": len(h), "final_loss": h[-1]["loss"], "final_accuracy": h[-1]["accuracy"],
            "chance": stats["chance"], "seconds": stats["seconds"]}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--no-ssl", action="store_true", help="Skip the attention+jigsaw arm.")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine).")
    p.set_defaults(seeds=[0, 1, 2])
    args = p.parse_args()
    from cyto_edge.train.models.jigsaw import PatchAttentionClassifier, build_trunk

    torch.set_num_threads(args.threads)
    st = settings(args.small)
    root = synth_dir(st["images"], st["size"], seed=0, um_per_px=st["um"])
    train, test = crop_sets(root, 3 * st["patch"], st["per_image"], "binary")
    data = {"train_crops": train.counts(), "test_crops": test.counts(), "classes": train.classes,
            "patch_px": st["patch"], "um_per_px": st["um"], "fields": st["images"], "epochs": st["epochs"]}
    tmp = Path(tempfile.mkdtemp(prefix="patch-attention-"))
    arms = {"no-attention": (False, None), "attention": (True, None)}
    ssl = None
    if not args.no_ssl:
        ssl = pretrain_trunk(root, st, tmp / "jigsaw.pt")
        arms["attention+jigsaw"] = (True, tmp / "jigsaw.pt")
    results = {}
    for arm, (att, init) in arms.items():
        runs = []
        for seed in args.seeds:
            build = lambda att=att: PatchAttentionClassifier(build_trunk("plain", **st["trunk"]), 2, attention=att)  # noqa: E731
            r = run_classifier(build, train, test, seed=seed, epochs=st["epochs"], lr=st["lr"], init=init)
            r["weights"] = patch_weight_figures(r["model"], test)
            runs.append(r)
        fig = {"accuracy": mean_std([r["scores"]["accuracy"] for r in runs]),
               "weighted_f1": mean_std([r["scores"]["weighted_f1"] for r in runs]),
               "params": runs[0]["params"], "train_seconds": mean_std([r["train_seconds"] for r in runs])["mean"]}
        for k in ("patch_weight_lesion", "patch_weight_other"):
            if runs[0]["weights"]:
                fig[k] = mean_std([r["weights"][k] for r in runs])
        if init is not None:
            fig["init_tensors"], fig["pretraining"] = runs[0]["init_tensors"], ssl
        results[arm] = fig
        emit("patch_attention", fig, torch_threads=args.threads, arm=arm, trunk=st["trunk"], seeds=args.seeds, data=data)
    a, b = results["attention"], results["no-attention"]
    summary = {"accuracy_diff_attention": round(a["accuracy"]["mean"] - b["accuracy"]["mean"], 4)}
    if "attention+jigsaw" in results:
        summary["accuracy_diff_jigsaw"] = round(results["attention+jigsaw"]["accuracy"]["mean"] - a["accuracy"]["mean"], 4)
    emit("patch_attention_summary", summary, torch_threads=args.threads, seeds=args.seeds, data=data)


if __name__ == "__main__":
    main()
