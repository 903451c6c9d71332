"""`cyto-edge calibrate`: per-class operating thresholds from a validation set, written into the manifest."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cyto_edge.runtime.run_cli import unwrap

HELP = """Choose per-class operating thresholds on a validation set and write them into the bundle's manifest.

For each class, the highest score threshold whose recall (IoU 0.5) reaches --target-recall: a screening
device should miss few abnormal cells, and precision is what it costs. The bundle is run through the
device's own pipeline (tiled at the model's scale) with a decoder threshold of 0.01, so that every
candidate threshold can be tried. A class that cannot reach the target gets the threshold of its highest
reachable recall (with a warning); a class without ground truth keeps its threshold. The manifest is
rewritten atomically and re-hashed; the result is also recorded under quality.calibration.

Calibrate on a validation split (`cyto-edge data split` carves one from train), never on test: thresholds
chosen on the test set make its figures optimistic.

    cyto-edge calibrate model.cytobundle --data data/synth --target-recall 0.95 --classes hsil,scc
"""
CALIB_SCORE = 0.01


def register(app: typer.Typer) -> None:
    @app.command("calibrate", help=unwrap(HELP))
    def calibrate(
        bundle: Path = typer.Argument(..., help="The bundle directory (.cytobundle) to calibrate in place."),
        data: Path = typer.Option(..., "--data", help="Dataset with a validation split (COCO, VOC, synth)."),
        target_recall: float = typer.Option(0.95, "--target-recall", help="Recall each class must reach, (0, 1]."),
        classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated classes (default: all)."),
        split: str = typer.Option("val", "--split", help="val (default), train or test (warned)."),
        engine: Optional[str] = typer.Option(None, "--engine", help="onnxruntime (default) | openvino | tensorrt."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Engine threads."),
        max_images: Optional[int] = typer.Option(None, "--max-images", help="Use the first N images only."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the thresholds; do not write the manifest."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ):
        result = calibrate_bundle(bundle, data, target_recall=target_recall,
                                  classes=[c.strip() for c in classes.split(",") if c.strip()] if classes else None,
                                  split=split, engine=engine, threads=threads, max_images=max_images,
                                  write=not dry_run)
        if json_out:
            from cyto_edge._cli_util import print_json

            print_json(result)


def calibrate_bundle(bundle_path: Path, data: Path, *, target_recall: float, classes: list[str] | None,
                     split: str, engine: str | None, threads: int | None, max_images: int | None,
                     write: bool = True) -> dict:
    import warnings

    from rich.console import Console
    from rich.progress import Progress

    from cyto_edge.errors import BadInput
    from cyto_edge.runtime.bundle import Bundle
    from cyto_edge.runtime.calibration import CalibrationWarning, apply_thresholds, calibrate_thresholds
    from cyto_edge.runtime.decode import PostProcess
    from cyto_edge.runtime.evaluate import detect_all, ground_truth, load_dataset
    from cyto_edge.runtime.pipeline import build_pipeline

    console = Console(stderr=True)
    if not 0 < target_recall <= 1:
        raise BadInput(f"--target-recall must be in (0, 1], got {target_recall}")
    if write and not Path(bundle_path).is_dir():
        raise BadInput(f"{bundle_path}: calibrate writes into a bundle directory; unpack the archive first "
                       "(or use --dry-run)")
    if split == "test":
        console.print("[yellow]warning:[/] calibrating on the test split makes its figures optimistic; "
                      "use a validation split (`cyto-edge data split`)")
    b = Bundle.open(bundle_path)
    ds = load_dataset(data, split)
    if max_images:
        ds = ds.subset(range(min(max_images, len(ds))))
    gt = ground_truth(ds, b.classes)
    pipe = build_pipeline(b, backend=engine, threads=threads, camera_um_per_px=ds.um_per_px, stages=False,
                          count=False, preview_engine=False)
    pp = b.manifest.postprocess
    cfg = PostProcess(score_threshold=CALIB_SCORE, nms_iou=pp.nms_iou, max_detections=pp.max_detections,
                      pre_nms_topk=pp.pre_nms_topk)
    with Progress(console=console, transient=True) as prog:
        task = prog.add_task(f"detecting ({split})", total=len(ds))
        dets = detect_all(pipe, [im.file for im in ds.images], pipe.factor, cfg, lambda: prog.advance(task))
    current = {c: float(pp.class_thresholds.get(c, pp.score_threshold)) for c in b.classes}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        res = calibrate_thresholds(gt, dets, b.classes, target_recall, classes, default=current)
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}")
    if write:
        apply_thresholds(b.manifest, res, target_recall)
        b.manifest.quality["calibration"].update({"data": str(data), "split": split, "n_images": len(ds)})
        b.save()
        Bundle.open(bundle_path)      # re-read and re-verify what was written
    _print(res, console, write, bundle_path)
    return {"bundle": str(bundle_path), "data": str(data), "split": split, "target_recall": target_recall,
            "written": write, "classes": res}


def _print(res: dict, console, written: bool, path) -> None:
    from rich.table import Table

    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    t = Table(title="operating thresholds" + (f" written to {path}" if written else " (not written)"))
    for col in ("class", "GT", "threshold", "recall", "precision", "status"):
        t.add_column(col)
    for name, r in res.items():
        t.add_row(name, str(r["n_gt"]), f(r["threshold"]), f(r["recall"]), f(r["precision"]), r["status"])
    console.print(t)
