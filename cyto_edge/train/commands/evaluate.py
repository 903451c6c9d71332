"""`cyto-edge eval`: a checkpoint (torch) or a bundle (torch-free, through the runtime engines)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

HELP = """Evaluate a detector checkpoint (.pt) or a model bundle (.cytobundle) on a dataset.

Full images are tiled exactly as the device tiles them. Box level (default): per-class AP, precision,
recall and mean IoU at IoU 0.5 (the paper's Table 2 columns), mAP@0.5 and COCO mAP@[.5:.95]; PR-curve
PNGs and metrics.json go to --out. FOV level (--level fov, bundles): sensitivity and specificity of the
FOV grade against the per-image truth that `cyto-edge synth` records.

    cyto-edge eval runs/teacher/best.pt --data data/synth --split test --out eval/teacher
"""


def _print_table(m, console) -> None:
    from rich.table import Table

    t = Table(title=f"mAP@0.5 {m.map50 if m.map50 is not None else float('nan'):.3f}   "
                    f"mAP@[.5:.95] {m.map if m.map is not None else float('nan'):.3f}   ({m.n_images} images)")
    for col in ("class", "GT", "AP@0.5", "AP@[.5:.95]", "precision", "recall", "mean IoU"):
        t.add_column(col, justify="right" if col != "class" else "left")
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for c in m.classes:
        t.add_row(c.name, str(c.n_gt), f(c.ap50), f(c.ap), f(c.precision), f(c.recall), f(c.mean_iou))
    console.print(t)


def evaluate_checkpoint(ckpt_path: Path, data: Path, split: str, out: Path | None, overlap: int | None,
                        threshold: float, max_images: int | None) -> dict:
    import json

    from rich.console import Console
    from rich.progress import Progress

    from cyto_edge.errors import BadInput
    from cyto_edge.runtime.plots import write_pr_plots
    from cyto_edge.train.checkpoint import load_checkpoint
    from cyto_edge.train.data.load import load_detection
    from cyto_edge.train.evaluate import evaluate_model
    from cyto_edge.train.mil import inference_model_from_checkpoint

    console = Console(stderr=True)
    ck = load_checkpoint(ckpt_path)
    ds = load_detection(data, split=split)
    if list(ds.classes) != list(ck["classes"]):
        raise BadInput(f"{data}: dataset classes {ds.classes} do not match the checkpoint's {ck['classes']}")
    model = inference_model_from_checkpoint(ck)   # with its MIL head (re-scoring) when trained with one
    norm = ck["normalization"]
    n = min(len(ds), max_images) if max_images else len(ds)
    with Progress(console=console, transient=True) as prog:
        task = prog.add_task("evaluating", total=n)
        metrics, _ = evaluate_model(model, ds, model_um_per_px=ck["um_per_px"],
                                    overlap=overlap if overlap is not None else ck.get("tile_overlap", 160),
                                    mean=norm["mean"], std=norm["std"], max_images=max_images,
                                    operating_threshold=threshold, progress=lambda: prog.advance(task))
    _print_table(metrics, console)
    result = {"model": str(ckpt_path), "data": str(data), "split": split, **metrics.to_dict()}
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        plots = write_pr_plots(metrics, out)
        console.print(f"metrics.json and {len(plots)} PR curves in {out}")
    return result


def register(app: typer.Typer) -> None:
    @app.command("eval", help=HELP)
    def evaluate(
        model: Path = typer.Argument(..., help="Checkpoint (.pt) or bundle (.cytobundle dir, .zip or .tar)."),
        data: Path = typer.Option(..., "--data", help="Dataset (CDetector layout, VOC, ...)."),
        split: str = typer.Option("test", "--split", help="Which split to evaluate."),
        level: str = typer.Option("box", "--level", help="box or fov (fov: bundles only)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Directory for metrics.json and PR curves."),
        overlap: Optional[int] = typer.Option(None, "--overlap", help="Tile overlap px (default: the model's)."),
        threshold: float = typer.Option(0.5, "--threshold", help="Operating score threshold for P/R columns."),
        max_images: Optional[int] = typer.Option(None, "--max-images", help="Evaluate the first N images only."),
        engine: Optional[str] = typer.Option(None, "--engine", help="Bundle: onnxruntime | openvino | tensorrt."),
        json_out: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    ):
        from cyto_edge._cli_util import print_json
        from cyto_edge.errors import BadInput

        if level not in ("box", "fov"):
            raise BadInput(f"--level {level!r}: choose box or fov")
        is_bundle = model.is_dir() or model.suffix in (".zip", ".tar", ".gz") or model.name.endswith(".cytobundle")
        if is_bundle:
            from cyto_edge.runtime.evaluate import evaluate_bundle_cli

            result = evaluate_bundle_cli(model, data, split=split, level=level, out=out, overlap=overlap,
                                         threshold=threshold, max_images=max_images, engine=engine)
        else:
            if level == "fov":
                raise BadInput("--level fov needs a bundle (the FOV grade is computed by the runtime)")
            result = evaluate_checkpoint(model, data, split, out, overlap, threshold, max_images)
        if json_out:
            print_json(result)
