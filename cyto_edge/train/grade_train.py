"""Training of the learned FOV grader (`cyto-edge train-grader`) from FOV-level labels only.

A FOV's label is its Bethesda grade: synth's per-image `truth.fov_grade`, or a CSV `file,grade`. Its
cells are cut from the image (uint8 RGB crops, `cellcrops.cut_crop`) around
- "nuclei": the `max_cells` largest nuclei found by `runtime.nuclei.segment_nuclei` (label-free, the same
  code on the device), a square window of `window_um` µm around each; or
- "gt": the dataset's boxes (with `context`), e.g. detections saved as a COCO set;
and read in raster order (`cellcrops.raster_order`). No cell label is ever used. The classes are the
grades present, ordered by Bethesda severity (class 0, the least severe, plays NILM's role in the
sample-selection rule). Metrics: accuracy, per-class report, and sensitivity / specificity of
"grade >= LSIL" at FOV level.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from cyto_edge.errors import BadInput
from cyto_edge.runtime.taxonomy import BETHESDA_ORDER, SEVERITY
from cyto_edge.train.cellcrops import CropSpec, cut_crop, raster_order, to_rgb
from cyto_edge.train.classify import MEAN, STD, Steps, augment, confusion_png, report, set_threads, to_input
from cyto_edge.train.models.grader import FOVGrader, GraderConfig, grader_loss

CKPT_FORMAT = "cyto-edge/fov-grader"
ROW_PX = 32.0


@dataclass
class GraderSettings:
    cells: str = "nuclei"             # nuclei | gt
    max_cells: int = 48
    crop: int = 64                    # px of the crop fed to the CNN
    window_um: float = 64.0           # nuclei: window side in µm
    context: float = 0.25             # gt: margin around each box
    um_per_px: float | None = None    # None: the dataset's (synth records it)
    grades: list[str] | None = None   # keep only FOVs of these grades (after `merge`)
    merge: dict[str, str] = field(default_factory=dict)   # grade -> grade it counts as, e.g. ASC-US -> LSIL
    width: int = 16                   # backbone width (small ResNet)
    hidden: int = 64
    vit_dim: int = 64
    vit_layers: int = 2
    vit_heads: int = 4
    local: bool = True                # ViT + cross attention
    lam: float = 0.25                 # lambda of L_cell (0: no cell branches)
    peephole: bool = True
    epochs: int = 20
    batch: int = 8                    # FOVs per step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.25
    seed: int = 0
    threads: int = 0
    backbone_ckpt: str | None = None  # a cell-classifier checkpoint for the CNN
    freeze_backbone: bool = False

    def config(self, num_classes: int) -> GraderConfig:
        return GraderConfig(num_classes=num_classes, crop=self.crop, backbone="small",
                            backbone_kw={"width": self.width, "dnl": False}, hidden=self.hidden,
                            vit_dim=self.vit_dim, vit_layers=self.vit_layers, vit_heads=self.vit_heads,
                            local=self.local, peephole=self.peephole)


@dataclass
class FovSet:
    crops: list[np.ndarray]           # per FOV uint8 (n_i, S, S, 3) RGB, raster order
    labels: np.ndarray                # (F,) int64 into classes
    classes: list[str]                # Bethesda categories, least severe first
    files: list[str]
    cells: dict                       # how cells were chosen (the stage's "cells" entry)
    spec: CropSpec
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------------------- labels

def parse_merge(text: str | None) -> dict[str, str]:
    """'ASC-US=LSIL,ASC-H=HSIL' -> {"ASC-US": "LSIL", "ASC-H": "HSIL"}."""
    out = {}
    for part in (text or "").split(","):
        if part.strip():
            a, sep, b = part.partition("=")
            if not sep:
                raise BadInput(f"--merge: {part.strip()!r} must look like ASC-US=LSIL")
            out[parse_grade(a, "--merge")] = parse_grade(b, "--merge")
    return out


def parse_grade(text: str, where: str) -> str:
    """'nilm' / 'ASC_US' / 'ascus' / 'HSIL' -> a Bethesda category, else BadInput."""
    t = str(text).strip().upper().replace("_", "-").replace(" ", "-")
    t = {"ASCUS": "ASC-US", "ASCH": "ASC-H", "NEGATIVE": "NILM"}.get(t, t)
    if t not in SEVERITY:
        raise BadInput(f"{where}: grade {text!r} is not a Bethesda category ({', '.join(BETHESDA_ORDER)})")
    return t


def read_grade_csv(path: Path) -> dict[str, str]:
    """CSV `file,grade` -> {file name: grade}."""
    from cyto_edge.train.data.common import column, read_csv_rows

    header, rows = read_csv_rows(path)
    fcol = column(header, ("file", "file_name", "filename", "image"), path)
    gcol = column(header, ("grade", "fov_grade", "label"), path)
    return {Path(f[fcol]).name: parse_grade(f[gcol], f"{path}: line {n}: grade") for n, f in rows}


def fov_grades(ds, labels_csv: Path | None = None) -> list[str | None]:
    """One grade per image of a DetectionDataset (None: unlabelled)."""
    table = read_grade_csv(Path(labels_csv)) if labels_csv else None
    out = []
    for i, im in enumerate(ds.images):
        if table is not None:
            out.append(table.get(Path(im.file).name))
        elif im.truth.get("fov_grade") is not None:
            out.append(parse_grade(im.truth["fov_grade"], f"{ds.root}: images[{i}].truth.fov_grade"))
        else:
            out.append(None)
    return out


# ----------------------------------------------------------------------------------------- cells

def nuclei_boxes(img_bgr: np.ndarray, um_per_px: float, max_cells: int, window_um: float) -> np.ndarray:
    """(K, 4) xyxy px windows around the `max_cells` largest nuclei, K <= max_cells."""
    from cyto_edge.runtime.nuclei import segment_nuclei

    nu = segment_nuclei(img_bgr, um_per_px)
    keep = np.argsort(-nu.areas_um2, kind="stable")[:max_cells]
    c = nu.centres[keep]                                       # (K, 2) xy px
    half = window_um / um_per_px / 2
    return np.concatenate([c - half, c + half], 1).astype(np.float32).reshape(-1, 4)


def fov_crops(img_bgr: np.ndarray, boxes: np.ndarray, s: GraderSettings, spec: CropSpec, where: str) -> np.ndarray:
    """Crops (n, S, S, 3) uint8 RGB of the boxes, in raster order."""
    rgb = to_rgb(img_bgr, where)
    order = raster_order(boxes, ROW_PX)
    crops = [cut_crop(rgb, boxes[j], s.crop, spec) for j in order]
    return np.stack(crops) if crops else np.zeros((0, s.crop, s.crop, 3), np.uint8)


def build_fovset(ds, grades: list[str | None], s: GraderSettings, progress: bool = True) -> FovSet:
    """Cut every labelled FOV's cells. BadInput when nothing is labelled or a grade is filtered away."""
    um = s.um_per_px or ds.um_per_px
    if s.cells not in ("nuclei", "gt"):
        raise BadInput(f"--cells must be nuclei or gt, got {s.cells!r}")
    if s.cells == "nuclei" and not um:
        raise BadInput(f"{ds.root}: the images' scale is unknown; give --um-per-px (µm per pixel)")
    grades = [s.merge.get(g, g) if g else g for g in grades]
    keep = [i for i, g in enumerate(grades) if g is not None and (not s.grades or g in s.grades)]
    warnings = [f"{len(grades) - len(keep)} images without a usable grade were skipped"] if len(keep) < len(grades) else []
    if not keep:
        raise BadInput(f"{ds.root}: no FOV labels; give --labels CSV (file,grade) or a set whose images have "
                       "truth.fov_grade (cyto-edge synth)")
    classes = sorted({grades[i] for i in keep}, key=SEVERITY.get)
    if len(classes) < 2:
        raise BadInput(f"{ds.root}: every FOV is {classes[0]}; a grader needs at least two grades")
    side = s.window_um / um if s.cells == "nuclei" else None
    spec = CropSpec(context=0.0 if side else s.context, fixed_side=side)
    crops = []
    with Steps(progress) as bar:
        tick = bar.task("cells", len(keep))
        for i in keep:
            im = ds.images[i]
            img = cv2.imread(str(im.file), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise BadInput(f"{im.file}: cannot decode the image")
            boxes = (nuclei_boxes(img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR), um,
                                  s.max_cells, s.window_um) if s.cells == "nuclei"
                     else np.asarray(im.boxes, np.float32)[:s.max_cells])
            crops.append(fov_crops(img, boxes, s, spec, str(im.file)))
            tick()
    cells = {"source": s.cells, "max_cells": s.max_cells, "row_px": ROW_PX, "rank": "nuclear_area"
             if s.cells == "nuclei" else "given", "window_um": s.window_um if s.cells == "nuclei" else None,
             "um_per_px": um, "merge": dict(s.merge)}
    return FovSet(crops, np.asarray([classes.index(grades[i]) for i in keep], np.int64), classes,
                  [str(ds.images[i].file) for i in keep], cells, spec, warnings)


# -------------------------------------------------------------------------------------- batching

def collate(fs: FovSet, idx, gen: torch.Generator | None = None):
    """FOVs idx -> cells (B, N, 3, S, S) float32, mask (B, N) bool, labels (B,); augmented with `gen`."""
    n = max([len(fs.crops[i]) for i in idx] + [0])
    S = fs.crops[idx[0]].shape[1] if len(idx) else 0
    cells = torch.zeros(len(idx), n, 3, S, S)
    mask = torch.zeros(len(idx), n, dtype=torch.bool)
    for b, i in enumerate(idx):
        k = len(fs.crops[i])
        if k:
            x = to_input(fs.crops[i])
            cells[b, :k] = augment(x, gen) if gen is not None else x
            mask[b, :k] = True
    return cells, mask, torch.as_tensor(fs.labels[list(idx)])


@torch.no_grad()
def cnn_features(model: FOVGrader, fs: FovSet) -> list:
    """Per FOV (x (n, d_f), stage-4 maps (n, d_c, h, w)) from the CNN in eval mode: a frozen CNN's
    outputs never change, so training caches them (no augmentation then)."""
    was = model.encoder.training
    model.encoder.eval()
    out = [model.encoder(to_input(c)) if len(c) else None for c in fs.crops]
    model.encoder.train(was)
    return out


def collate_features(feats: list, fs: FovSet, idx, d_f: int):
    """Cached CNN outputs of FOVs idx -> (x (B, N, d_f), maps (n_real, d_c, h, w), mask (B, N)), labels (B,)."""
    n = max([len(fs.crops[i]) for i in idx] + [0])
    got = [feats[i] for i in idx if feats[i] is not None]
    x = torch.zeros(len(idx), n, d_f)
    mask = torch.zeros(len(idx), n, dtype=torch.bool)
    for b, i in enumerate(idx):
        if feats[i] is not None:
            x[b, :len(feats[i][0])] = feats[i][0]
            mask[b, :len(feats[i][0])] = True
    maps = torch.cat([f[1] for f in got]) if got else torch.zeros(0)
    return (x, maps, mask), torch.as_tensor(fs.labels[list(idx)])


def _batch_out(model: FOVGrader, fs: FovSet, idx, feats, gen=None):
    """Model outputs, mask and labels for FOVs idx (from cached features when given)."""
    if feats is not None:
        (x, maps, mask), y = collate_features(feats, fs, idx, model.encoder.d_f)
        return model.forward_features(x, maps, mask), mask, y
    cells, mask, y = collate(fs, idx, gen)
    return model(cells, mask), mask, y


@torch.no_grad()
def predict(model: FOVGrader, fs: FovSet, idx, batch: int = 8, feats: list | None = None) -> np.ndarray:
    """(len(idx), C) FOV probabilities (eval mode)."""
    was = model.training
    model.eval()
    out = [_batch_out(model, fs, idx[i:i + batch], feats)[0]["probs"] for i in range(0, len(idx), batch)]
    model.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, len(fs.classes)), np.float32)


def fov_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """`report` plus sensitivity / specificity of grade >= LSIL."""
    rep = report(y_true, y_pred, classes)
    pos = np.asarray([SEVERITY[c] >= SEVERITY["LSIL"] for c in classes])
    t, p = pos[y_true], pos[y_pred]
    rep["sensitivity"] = round(float((t & p).sum() / t.sum()), 4) if t.any() else None
    rep["specificity"] = round(float((~t & ~p).sum() / (~t).sum()), 4) if (~t).any() else None
    return rep


# -------------------------------------------------------------------------------------- training

def build_model(s: GraderSettings, num_classes: int) -> FOVGrader:
    """A grader; with `backbone_ckpt`, its CNN is the cell classifier's (architecture and weights)."""
    cfg = s.config(num_classes)
    if not s.backbone_ckpt:
        return FOVGrader(cfg)
    from cyto_edge.train.classify import load_checkpoint

    clf, meta = load_checkpoint(s.backbone_ckpt)
    cfg.backbone, cfg.backbone_kw = meta["arch"], dict(meta["arch_kw"])
    model = FOVGrader(cfg)
    state = {k: v for k, v in clf.state_dict().items() if not k.startswith("fc.")}
    model.encoder.cnn.load_state_dict(state, strict=False)
    if s.freeze_backbone:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    return model


def _train_mode(model: FOVGrader, frozen: bool) -> None:
    model.train()
    if frozen:
        model.encoder.eval()                                   # frozen BatchNorm statistics too


def fit(model: FOVGrader, fs: FovSet, tr: np.ndarray, va: np.ndarray, s: GraderSettings, on_step=None):
    """AdamW, warm-up + cosine; keeps the epoch with the best validation accuracy (when there is one).
    Returns (model, history [{epoch, loss, roi, cell, val_acc}])."""
    gen = torch.Generator().manual_seed(s.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    per_epoch = max(1, math.ceil(len(tr) / s.batch))
    total, warm = s.epochs * per_epoch, min(per_epoch, 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 *
                                              (1 + math.cos(math.pi * min(i, total) / total)))
    best, history = (-1.0, None), []
    feats = cnn_features(model, fs) if s.freeze_backbone else None
    for epoch in range(s.epochs):
        _train_mode(model, s.freeze_backbone)
        perm = tr[torch.randperm(len(tr), generator=gen).numpy()]
        parts = []
        for i in range(0, len(perm), s.batch):
            out, mask, y = _batch_out(model, fs, perm[i:i + s.batch], feats, gen)
            loss, p = grader_loss(out, mask, y, s.lam if s.local else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            sched.step()
            parts.append((loss.item(), p["roi"], p["cell"]))
            if on_step:
                on_step(f"epoch {epoch + 1}/{s.epochs} loss {parts[-1][0]:.3f}")
        m = np.mean(parts, 0) if parts else [float("nan")] * 3
        rec = {"epoch": epoch + 1, "loss": round(float(m[0]), 4), "roi": round(float(m[1]), 4),
               "cell": round(float(m[2]), 4)}
        if len(va):
            acc = float((predict(model, fs, va, feats=feats).argmax(1) == fs.labels[va]).mean())
            rec["val_acc"] = round(acc, 4)
            if acc >= best[0]:
                best = (acc, copy.deepcopy(model.state_dict()))
        history.append(rec)
    if best[1] is not None:
        model.load_state_dict(best[1])
    model.eval()
    return model, history


def train_grader(fs: FovSet, s: GraderSettings, out_dir: Path | None = None, progress: bool = True,
                 test: FovSet | None = None) -> dict:
    """Train on a stratified split of `fs` (validation picks the epoch); report on the validation split
    and, when given, on `test`. Writes grader.pt, metrics.json and confusion.png into `out_dir`."""
    from cyto_edge.train.classify import splits

    set_threads(s.threads)
    if not 0 <= s.val_fraction < 1:
        raise BadInput("--val-fraction must be in [0, 1)")
    if s.lam > 0 and not s.local:
        raise BadInput("--lambda-cell needs the local branch (drop --no-local or set --lambda-cell 0)")
    torch.manual_seed(s.seed)
    tr, va = splits(fs.labels, 1, s.val_fraction, s.seed)[0]
    model = build_model(s, len(fs.classes))
    with Steps(progress) as bar:
        tick = bar.task("grader", s.epochs * math.ceil(len(tr) / s.batch))
        model, hist = fit(model, fs, tr, va, s, on_step=tick)
    summary = {"classes": fs.classes, "fovs": len(fs), "n_train": int(len(tr)), "n_val": int(len(va)),
               "cells_per_fov": round(float(np.mean([len(c) for c in fs.crops])), 1),
               "params": sum(p.numel() for p in model.parameters()), "settings": asdict(s), "history": hist}
    if len(va):
        summary["val"] = fov_report(fs.labels[va], predict(model, fs, va).argmax(1), fs.classes)
    if test is not None:
        _check_test_classes(fs, test)
        summary["test"] = fov_report(test.labels, predict(model, test, np.arange(len(test))).argmax(1), fs.classes)
    if out_dir:
        _write(Path(out_dir), model, s, fs, summary)
    return summary


def _check_test_classes(fs: FovSet, test: FovSet) -> None:
    extra = [c for c in test.classes if c not in fs.classes]
    if extra:
        raise BadInput(f"test set grades {extra} were not seen in training ({', '.join(fs.classes)})")
    test.labels = np.asarray([fs.classes.index(test.classes[i]) for i in test.labels], np.int64)
    test.classes = fs.classes


def _write(out: Path, model: FOVGrader, s: GraderSettings, fs: FovSet, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    metrics = summary.get("test") or summary.get("val") or {}
    torch.save(checkpoint(model, s, fs, metrics), out / "grader.pt")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    if metrics.get("n"):
        which = "test" if "test" in summary else "validation"
        confusion_png(metrics["confusion"], fs.classes, out / "confusion.png",
                      f"FOV grade ({which}): acc {metrics['accuracy']}")


def checkpoint(model: FOVGrader, s: GraderSettings, fs: FovSet, metrics: dict) -> dict:
    return {"format": CKPT_FORMAT, "version": 1, "config": model.cfg.to_dict(), "classes": fs.classes,
            "state_dict": model.state_dict(), "settings": asdict(s), "cells": fs.cells,
            "crop": fs.spec.to_dict(), "metrics": metrics,
            "input": {"size": [s.crop, s.crop], "layout": "NCHW", "color": "RGB", "scale": 1 / 255,
                      "mean": list(MEAN), "std": list(STD), "resize": "resize"}}


def load_grader(path: str | Path) -> tuple[FOVGrader, dict]:
    """(model in eval mode, checkpoint dict without the weights); BadInput for anything else."""
    p = Path(path)
    try:
        ck = torch.load(p, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise BadInput(f"{p}: no such checkpoint") from None
    except Exception as e:  # noqa: BLE001 - any unpickling error is a bad file
        raise BadInput(f"{p}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise BadInput(f"{p}: not a FOV-grader checkpoint; train one with `cyto-edge train-grader`")
    model = FOVGrader(GraderConfig(**ck["config"]))
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return model, {k: v for k, v in ck.items() if k != "state_dict"}
