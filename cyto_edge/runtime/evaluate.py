"""`cyto-edge eval BUNDLE`: a bundle evaluated through the device's own pipeline, without torch.

Every image goes through `Pipeline.detect` (tiling.detect_frame: rescaled from the dataset's µm/px to the
model's, tiled, decoded by the one decoder), the very function the training-side evaluation and the
device use. Box level: per-class AP@0.5, AP@[.5:.95], precision, recall and mean IoU at the operating
thresholds, mAP@0.5, COCO mAP@[.5:.95], PR curves (PNG) and metrics.json. Detections are kept down to a
score of 0.05 (as the checkpoint evaluation does), so that the PR curves are complete. The operating
thresholds are the manifest's calibrated class thresholds where it has them, else `--threshold`.

FOV level: each image is graded by `Pipeline.grade` (the manifest's thresholds and grading rule) and its
grade compared with the per-image truth that `cyto-edge synth` records (`truth.fov_grade`): sensitivity
and specificity for "grade >= ASC-US" and ">= LSIL" (runtime.metrics.fov_metrics), the confusion matrix,
the same for the learned grader when the bundle has one, and the squamous-count error against
`truth.squamous_count`.

The dataset readers (cyto_edge.train.data.load) are numpy + OpenCV only; they are imported inside the
function, so importing this module loads nothing of the training side.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.runtime.decode import Detections, PostProcess
from cyto_edge.runtime.metrics import evaluate_detections, fov_metrics

EVAL_SCORE = 0.05              # decoder threshold for box-level evaluation (complete PR curves)
FOV_POSITIVES = ("ASC-US", "LSIL")


def load_dataset(data: Path, split: str):
    """The torch-free dataset readers (numpy + OpenCV)."""
    from cyto_edge.train.data.load import load_detection

    return load_detection(data, split=split)


def read_frame(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 BGR, read as the checkpoint evaluation reads it."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise BadInput(f"{path}: cannot read image (missing or corrupt); run `cyto-edge data check` on the dataset")
    return img


def ground_truth(ds, classes: Sequence[str]) -> list[dict]:
    """Dataset records -> {"boxes", "labels" (bundle class indices), "boxed"}; dataset classes are mapped
    by name; a class the bundle does not have is refused."""
    extra = [c for c in ds.classes if c not in classes]
    if extra:
        raise BadInput(f"{ds.root}: dataset classes {extra} are not classes of the bundle ({', '.join(classes)})")
    remap = np.asarray([list(classes).index(c) for c in ds.classes], np.int64)
    return [{"boxes": im.boxes, "labels": remap[im.labels] if len(im.labels) else im.labels, "boxed": im.boxed}
            for im in ds.images]


def detect_all(pipeline, files: Sequence[Path], factor: float, cfg: PostProcess,
               tick: Callable[[], None] = lambda: None) -> list[Detections]:
    out = []
    for f in files:
        out.append(pipeline.detect(read_frame(f), cfg=cfg, factor=factor))
        tick()
    return out


def box_level(pipeline, ds, gt: list[dict], factor: float, threshold: float, tick) -> tuple[dict, object]:
    pp = pipeline.manifest.postprocess
    cfg = PostProcess(score_threshold=EVAL_SCORE, nms_iou=pp.nms_iou, max_detections=pp.max_detections,
                      pre_nms_topk=pp.pre_nms_topk)
    dets = detect_all(pipeline, [im.file for im in ds.images], factor, cfg, tick)
    op = {c: float(pp.class_thresholds.get(c, threshold)) for c in pipeline.classes}
    m = evaluate_detections(gt, dets, pipeline.classes, score_threshold=op)
    return {**m.to_dict(), "operating_thresholds": op, "eval_score_threshold": EVAL_SCORE}, m


def fov_level(pipeline, ds, tick) -> dict:
    truth, rule, learned, sq_err = [], [], [], []
    skipped = 0
    for im in ds.images:
        t = (im.truth or {}).get("fov_grade")
        if t is None:
            skipped += 1
            tick()
            continue
        r = pipeline.grade(read_frame(im.file), fov_id=str(im.image_id))
        truth.append(t)
        rule.append(r.grade.grade)
        if r.learned_grade is not None:
            learned.append(r.learned_grade["grade"])
        ts = (im.truth or {}).get("squamous_count")
        if ts is not None and r.squamous_count is not None:
            sq_err.append(abs(r.squamous_count - ts) / max(ts, 1))
        tick()
    if not truth:
        raise BadInput(f"{ds.root}: no image has truth.fov_grade; FOV-level evaluation needs per-image grades "
                       "(`cyto-edge synth` records them)")
    out = {"n_fovs": len(truth), "skipped_without_truth": skipped,
           "rule": {p: fov_metrics(rule, truth, p).to_dict() for p in FOV_POSITIVES}}
    if learned:
        out["learned"] = {p: fov_metrics(learned, truth, p).to_dict() for p in FOV_POSITIVES}
    if sq_err:
        out["squamous_count"] = {"n": len(sq_err), "mean_abs_rel_error": round(float(np.mean(sq_err)), 4),
                                 "max_abs_rel_error": round(float(np.max(sq_err)), 4)}
    return out


def evaluate_bundle_cli(model: Path, data: Path, split: str = "test", level: str = "box", out: Path | None = None,
                        overlap: int | None = None, threshold: float = 0.5, max_images: int | None = None,
                        engine: str | None = None, threads: int | None = None, precision: str | None = None) -> dict:
    """Evaluate a bundle (box or FOV level) and write metrics.json (+ PR PNGs) to `out`; returns the result."""
    from rich.console import Console
    from rich.progress import Progress

    from cyto_edge.runtime.bundle import Bundle
    from cyto_edge.runtime.pipeline import build_pipeline

    if level not in ("box", "fov"):
        raise BadInput(f"--level {level!r}: choose box or fov")
    console = Console(stderr=True)
    bundle = Bundle.open(model)
    ds = load_dataset(data, split)
    if max_images:
        ds = ds.subset(range(min(max_images, len(ds))))
    gt = ground_truth(ds, bundle.classes)
    pipe = build_pipeline(bundle, backend=engine, precision=precision, threads=threads,
                          camera_um_per_px=ds.um_per_px, overlap=overlap, stages=level == "fov",
                          count=level == "fov", preview_engine=False)
    factor = pipe.factor
    result: dict = {"model": str(model), "data": str(data), "split": split, "level": level,
                    "engine": getattr(pipe.engine, "name", engine), "precision": getattr(pipe.engine, "precision", None),
                    "overlap": pipe.overlap, "scale_factor": round(factor, 4), "warnings": pipe.warnings}
    with Progress(console=console, transient=True) as prog:
        task = prog.add_task(f"evaluating ({level})", total=len(ds))
        tick = lambda: prog.advance(task)  # noqa: E731
        if level == "box":
            figures, metrics = box_level(pipe, ds, gt, factor, threshold, tick)
        else:
            figures, metrics = fov_level(pipe, ds, tick), None
    result.update(figures)
    _print(result, metrics, console)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
        n = 0
        if metrics is not None:
            from cyto_edge.runtime.plots import write_pr_plots

            n = len(write_pr_plots(metrics, out))
        console.print(f"metrics.json{f' and {n} PR curves' if n else ''} in {out}")
    return result


def _print(result: dict, metrics, console) -> None:
    from rich.table import Table

    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    if metrics is not None:
        t = Table(title=f"mAP@0.5 {f(metrics.map50)}   mAP@[.5:.95] {f(metrics.map)}   ({metrics.n_images} images)")
        for col in ("class", "GT", "AP@0.5", "AP@[.5:.95]", "precision", "recall", "mean IoU"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for c in metrics.classes:
            t.add_row(c.name, str(c.n_gt), f(c.ap50), f(c.ap), f(c.precision), f(c.recall), f(c.mean_iou))
        console.print(t)
        return
    t = Table(title=f"FOV grade vs truth ({result['n_fovs']} FOVs)")
    for col in ("grader", "positive", "sensitivity", "specificity", "accuracy", "TP", "FN", "TN", "FP"):
        t.add_column(col)
    for who in ("rule", "learned"):
        for pos, m in result.get(who, {}).items():
            t.add_row(who, f">= {pos}", f(m["sensitivity"]), f(m["specificity"]), f(m["accuracy"]),
                      *(str(m[k]) for k in ("tp", "fn", "tn", "fp")))
    console.print(t)
    if "squamous_count" in result:
        console.print(f"squamous count: mean |error| {100 * result['squamous_count']['mean_abs_rel_error']:.1f}%")
