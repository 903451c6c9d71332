"""Learned FOV grader ablation on synthetic fields (the rows of the global-local paper's Table 1), and the
learned grade against the rule-based grade at FOV level.

Data: `cyto-edge synth` fields (cached, shared with benchmarks/classifier.py), FOV labels from
truth.fov_grade merged into the paper's three grades (NILM; LSIL <- ASC-US, LSIL; HSIL <- ASC-H, AGC,
HSIL, SCC); cells: the largest nuclei found by runtime/nuclei.py (`--cells nuclei`); trained on the train
split (a quarter held out to pick the epoch), tested on the test split. As in the paper, where every row
shares one pretrained CNN, the cell features come from one frozen CNN per seed: the small attention
cell classifier trained with cell labels on the train split's nucleus-centred windows (labelled boxes,
and nuclei away from every box as 'normal'). The grader itself sees FOV labels only. Rows, over the seeds:
  att-blstm         the global branch alone (eq. 1-2), L = L_ROI
  att-blstm+vit+ca  + the cell transformer and cross attention (eq. 3-9), L = L_ROI
  full              + the CLAM-style cell branches, L = L_ROI + 0.25 L_cell
Figures: test accuracy and macro F1 (mean, std), and sensitivity / specificity of an abnormal FOV
(grade >= LSIL after the merge, i.e. >= ASC-US). `grader_vs_rules` (one line per seed): the rule-based
grade (runtime/grading.grade_fov, default policy: one cell at score >= 0.5 grades its category) over the
same nuclei candidates scored by that cell classifier, against the full row's learned grade, same FOVs.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from _common import emit, parser
from classifier import synth_set

MERGE = {"ASC-US": "LSIL", "ASC-H": "HSIL", "AGC": "HSIL", "SCC": "HSIL"}
ROWS = {"att-blstm": dict(local=False, lam=0.0), "att-blstm+vit+ca": dict(local=True, lam=0.0),
        "full": dict(local=True, lam=0.25)}


def fov_sets(root, s):
    from cyto_edge.train.data.load import load_detection
    from cyto_edge.train.grade_train import build_fovset, fov_grades

    out = []
    for split in ("train", "test"):
        ds = load_detection(root, split)
        out.append((ds, build_fovset(ds, fov_grades(ds), s, progress=False)))
    (_, tr), (tds, te) = out
    te.labels = np.asarray([tr.classes.index(te.classes[k]) for k in te.labels], np.int64)
    te.classes = tr.classes
    return tr, tds, te


def abnormal(pred: np.ndarray, truth: np.ndarray, classes: list[str]) -> dict:
    """Sensitivity / specificity of 'not NILM' (after the merge: >= LSIL)."""
    p = np.asarray([classes[k] != "NILM" for k in pred])
    t = np.asarray([classes[k] != "NILM" for k in truth])
    return {"sensitivity": round(float((p & t).sum() / max(t.sum(), 1)), 4),
            "specificity": round(float((~p & ~t).sum() / max((~t).sum(), 1)), 4)}


def grader_row(tr, te, base, flags: dict, seed: int) -> dict:
    """Train one grader variant; its test predictions and figures."""
    from cyto_edge.train.classify import splits
    from cyto_edge.train.grade_train import build_model, fit, fov_report, predict

    s = type(base)(**{**base.__dict__, **flags, "seed": seed})
    torch.manual_seed(seed)
    a, b = splits(tr.labels, 1, s.val_fraction, seed)[0]
    t0 = time.perf_counter()
    model, _ = fit(build_model(s, len(tr.classes)), tr, a, b, s)
    secs = time.perf_counter() - t0
    pred = predict(model, te, np.arange(len(te))).argmax(1)
    rep = fov_report(te.labels, pred, te.classes)
    return {"pred": pred, "acc": rep["accuracy"], "f1": rep["macro_f1"], "secs": secs,
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **dict(zip(("sens", "spec"), abnormal(pred, te.labels, te.classes).values()))}


def emit_rows(results: dict, tr, te, base, seeds) -> None:
    for row, recs in results.items():
        fig = {f"{k}_{m}": round(float(f([r[k] for r in recs])), 4) for k in ("acc", "f1", "sens", "spec")
               for m, f in (("mean", np.mean), ("std", np.std))}
        emit("grader", {**fig, "train_s_mean": round(float(np.mean([r["secs"] for r in recs])), 1),
                        "trainable_params": recs[0]["params"]},
             row=row, **ROWS[row], seeds=seeds, accuracy=[r["acc"] for r in recs], classes=tr.classes,
             train_fovs=len(tr), test_fovs=len(te), cells=base.cells, max_cells=base.max_cells, crop=base.crop,
             epochs=base.epochs, backbone="cell classifier (small, frozen)" if base.freeze_backbone else "trainable",
             torch_threads=2)


def cell_classifier(root, s, seed: int, epochs: int, out):
    """The attention classifier on nuclei-centred windows: labelled boxes (their class) and nuclei
    candidates away from every box ('normal'), from the train split."""
    import cv2

    from cyto_edge.train.cellcrops import CropSet, CropSpec, cut_crop, read_rgb
    from cyto_edge.train.classify import ClassifierSettings, build, checkpoint, fit
    from cyto_edge.train.data.load import load_detection
    from cyto_edge.train.grade_train import nuclei_boxes

    ds = load_detection(root, "train")
    um = ds.um_per_px or 1.0
    spec = CropSpec(fixed_side=s.window_um / um)
    crops, labels = [], []
    for im in ds.images:
        rgb = read_rgb(im.file)
        for b, lab in zip(im.boxes, im.labels):
            crops.append(cut_crop(rgb, b, s.crop, spec))
            labels.append(int(lab))
        cand = nuclei_boxes(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), um, s.max_cells, s.window_um)
        c = (cand[:, :2] + cand[:, 2:]) / 2
        free = [j for j in range(len(cand)) if not any((b[0] <= c[j, 0] <= b[2]) and (b[1] <= c[j, 1] <= b[3])
                                                         for b in im.boxes)]
        for j in free[:2]:
            crops.append(cut_crop(rgb, cand[j], s.crop, spec))
            labels.append(len(ds.classes))
    names = list(ds.classes) + ["normal"]
    cs = CropSet(np.stack(crops), np.asarray(labels), names, source="bench")
    cs_s = ClassifierSettings(arch="small", width=8, img_size=s.crop, epochs=epochs, lr=3e-3, val_fraction=0.0, seed=seed)
    torch.manual_seed(seed)
    model, _ = fit(build(cs_s, len(names)), cs.images, cs.labels, cs_s)
    cs.spec = spec
    torch.save(checkpoint(model, cs_s, cs), out)
    return model, names


def rule_grades(model, names, tds, te) -> np.ndarray:
    """grade_fov over the nuclei candidates scored by the classifier, merged like the learned grades."""
    from cyto_edge.runtime.decode import Detections
    from cyto_edge.runtime.grading import GradingPolicy, grade_fov
    from cyto_edge.runtime.taxonomy import Taxonomy
    from cyto_edge.train.classify import predict

    tax = Taxonomy.for_classes(names[:-1])
    policy = GradingPolicy()
    out = []
    for crops in te.crops:
        if len(crops):
            probs = predict(model, crops)[:, :-1]                        # drop 'normal'
            dets = Detections(np.zeros((len(probs), 4), np.float32), probs.max(1).astype(np.float32),
                              probs.argmax(1).astype(np.int64))
        else:
            dets = Detections.empty(tax.num_classes)
        g = grade_fov(dets, tax, policy).grade
        out.append(te.classes.index(MERGE.get(g, g)))
    return np.asarray(out)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    import tempfile
    from pathlib import Path

    from cyto_edge.train.grade_train import GraderSettings

    torch.set_num_threads(2)
    if args.small:
        images, size, clf_epochs = 800, 512, 30
        base = GraderSettings(cells="nuclei", max_cells=24, crop=32, window_um=48, hidden=32, vit_dim=32,
                              vit_layers=1, epochs=30, lr=2e-3, merge=MERGE, freeze_backbone=True)
    else:
        images, size, clf_epochs = 1000, 1024, 30
        base = GraderSettings(cells="nuclei", max_cells=64, crop=64, window_um=64, epochs=60, merge=MERGE,
                              freeze_backbone=True)
    root = synth_set(images, size)
    tr, tds, te = fov_sets(root, base)
    results: dict[str, list] = {row: [] for row in ROWS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            ckpt = Path(tmp) / f"clf{seed}.pt"
            clf, names = cell_classifier(root, base, seed, clf_epochs, ckpt)
            base.backbone_ckpt = str(ckpt)
            for row, flags in ROWS.items():
                results[row].append(grader_row(tr, te, base, flags, seed))
            rules = rule_grades(clf, names, tds, te)
            learned = results["full"][-1]["pred"]
            emit("grader_vs_rules", {"learned_acc": round(float((learned == te.labels).mean()), 4),
                                     "rules_acc": round(float((rules == te.labels).mean()), 4),
                                     **{f"learned_{k}": v for k, v in abnormal(learned, te.labels, te.classes).items()},
                                     **{f"rules_{k}": v for k, v in abnormal(rules, te.labels, te.classes).items()},
                                     "agreement": round(float((rules == learned).mean()), 4)},
                 seed=seed, test_fovs=len(te), classes=te.classes, rules="grade_fov default policy over the "
                 "nuclei candidates scored by the cell classifier", learned="full row, same seed", torch_threads=2)
    emit_rows(results, tr, te, base, args.seeds)


if __name__ == "__main__":
    main()
