"""`cyto-edge export` and `build-engine`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

EXPORT_HELP = """Export a checkpoint to a verified model bundle for one device family.

\b
--target decides the files:
  cpu       model.onnx (+ model.int8.onnx with --precision int8)
  rpi       model.onnx + model.int8.onnx (ONNX Runtime INT8 on ARM)
  openvino  model.onnx + openvino/model.xml (FP32) + the FP16 or INT8 IR
  jetson    model.onnx (+ model.int8.onnx), linted for TensorRT 10;
            the plan is built on the device: `cyto-edge build-engine`

\b
INT8 is one QDQ file (int8 symmetric, per-channel weights; the head's raw
outputs stay float) calibrated on --calib-images model-size tiles of the
train split, as the device cuts them. --calib-method: minmax (the range
seen), percentile (99.999th percentile of |x|: on the CPU teacher it lost
0.14 mAP point in OpenVINO where minmax lost 1.1), entropy (TensorRT's KL
threshold; it clips hardest: check the gate's figures).

\b
The acceptance gate: every file runs through its runtime engine on
validation images and is compared with the torch model (raw outputs,
matched detections, mAP@0.5); a file outside its tolerance makes the
command exit 1 (INT8: more than 1 mAP point below the torch model,
unless --accept-drop). `cyto-edge bundle info` shows the figures.

\b
Examples:
  cyto-edge export runs/student/best.pt --target openvino --precision int8 \\
      --out cyto.cytobundle
  cyto-edge export best.pt --target jetson --precision int8 \\
      --calib-method percentile --out jetson.cytobundle
"""


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    q = summary["quality"]
    t = Table(title=f"{summary['bundle']} ({summary['target']}, {summary['precision']}): torch mAP@0.5 "
                    f"{_f(q.get('torch_val_map50'))} on {q['gate']['val_images']} validation images")
    for col in ("file", "MB", "engine", "raw diff (int8: p99)", "matched", "mAP@0.5", "gate"):
        t.add_column(col, overflow="fold")
    for path, r in q["files"].items():
        size = sum(f["size"] for p, f in summary["files"].items() if p == path or p == path[:-4] + ".bin")
        ok = "[green]pass[/]" if r["passed"] else "[red]FAIL[/]"
        t.add_row(f"{path} ({r['precision']})", f"{size / 1e6:.2f}", r["engine"],
                  f"{max((r.get('raw_p99_rel_diff') or r['raw_max_rel_diff']).values()):.1e}", f"{r['matched']:.3f} of {r['reference_detections']}",
                  _f(r["map50"]), ok)
    Console().print(t)
    for path, r in q["files"].items():
        if not r["passed"]:
            print(f"{path}: {r['reason']}")
        ov = r.get("openvino_runtime")
        if ov and "convolutions" in ov:
            print(f"{path}: OpenVINO runs its convolutions as {ov['convolutions']} "
                  f"(int8 share {ov['int8_fraction']})")


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def register(app: typer.Typer) -> None:
    @app.command("export", help=EXPORT_HELP)
    def export(
        ckpt: Path = typer.Argument(..., help="A detector checkpoint (best.pt of `cyto-edge train`)."),
        target: str = typer.Option("cpu", "--target", help="cpu | rpi | openvino | jetson"),
        precision: Optional[str] = typer.Option(None, "--precision",
                                                help="fp32 | fp16 | int8 (default: fp32; rpi: int8; jetson: fp16)"),
        out: Optional[Path] = typer.Option(None, "--out", help="NAME.cytobundle (default: <target>.cytobundle)."),
        calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration data (its train split); default: the "
                                             "train part of the checkpoint's own split."),
        calib_images: int = typer.Option(64, "--calib-images", min=1, help="Model-size tiles for INT8 calibration."),
        calib_method: str = typer.Option("minmax", "--calib-method", help="minmax | entropy | percentile"),
        qat_epochs: int = typer.Option(0, "--qat-epochs", min=0,
                                       help="Quantization-aware fine-tuning epochs before INT8 "
                                            "(0: post-training quantization only)."),
        accept_drop: Optional[float] = typer.Option(None, "--accept-drop", min=0.0,
                                                    help="Accept an INT8 mAP@0.5 drop up to X (0.02 = 2 points)."),
        val: Optional[Path] = typer.Option(None, "--val", help="Validation data for the gate (its val split, else "
                                           "test); default: the checkpoint's validation split."),
        val_images: int = typer.Option(16, "--val-images", min=1, help="Validation images the gate runs."),
        opset: int = typer.Option(18, "--opset", min=13, max=21, help="ONNX opset (13+ for per-channel QDQ)."),
        threads: int = typer.Option(2, "--threads", min=1, help="CPU threads for torch and the engines."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ):
        from cyto_edge._cli_util import print_json
        from cyto_edge.errors import BadInput
        from cyto_edge.export.pipeline import ExportOptions, export_bundle, raise_failures

        out = out or Path(f"{target}.cytobundle")
        if out.suffix != ".cytobundle":
            raise BadInput(f"--out {out}: a bundle directory must end in .cytobundle")
        opts = ExportOptions(target=target, out=out, precision=precision, calib=calib, calib_images=calib_images,
                             calib_method=calib_method, qat_epochs=qat_epochs, accept_drop=accept_drop, val=val,
                             val_images=val_images, opset=opset, threads=threads)
        summary = export_bundle(ckpt, opts, check=False)
        if as_json:
            print_json(summary)
        else:
            _print_summary(summary)
        raise_failures(summary)

    @app.command("add-stage")
    def add_stage(
        stage: Path = typer.Argument(..., help="classifier.pt (train-classifier), grader.pt (train-grader), or an "
                                               "exported stage .onnx."),
        bundle: Path = typer.Argument(..., help="The detector bundle directory (NAME.cytobundle) to add it to."),
        as_json: bool = typer.Option(False, "--json", help="Print the stage record as JSON."),
    ):
        """Add a second stage (the cell classifier or the learned FOV grader) to a detector bundle.

        \b
        The checkpoint is exported to ONNX and checked against torch with ONNX
        Runtime (max |diff| <= 1e-4), its classes are checked against the
        bundle's (class names and Bethesda mapping for the classifier, Bethesda
        grades for the grader), then the file is copied into the bundle and the
        manifest re-hashed. An earlier stage of the same kind is replaced.
        The runtime then reclassifies detected cells (classifier) and grades
        each FOV with the model beside the rule-based grade (grader).

        \b
        Examples:
          cyto-edge add-stage runs/classifier/classifier.pt cyto.cytobundle
          cyto-edge add-stage runs/grader/grader.pt cyto.cytobundle
        """
        import tempfile

        from cyto_edge._cli_util import print_json
        from cyto_edge.export.second_stage import add_to_bundle, export_stage

        with tempfile.TemporaryDirectory(prefix="cyto-stage-") as tmp:
            rec = add_to_bundle(bundle, export_stage(stage, tmp))
        if as_json:
            print_json(rec)
        else:
            m = rec.get("metrics") or {}
            acc = f", accuracy {m['accuracy']:.3f} on its test data" if "accuracy" in m else ""
            print(f"{bundle}: {rec['kind']} {rec['file']} added ({len(rec['classes'])} classes: "
                  f"{', '.join(rec['classes'])}; ONNX Runtime vs torch max |diff| {rec['max_abs_diff']:.1e}{acc})")

    @app.command("build-engine")
    def build_engine(
        bundle: Path = typer.Argument(..., help="A bundle exported with --target jetson."),
        precision: str = typer.Option("fp16", "--precision", help="fp16 | int8 (from model.int8.onnx) | fp32"),
        workspace: int = typer.Option(1024, "--workspace", min=16, help="Builder workspace limit in MB."),
        dla: Optional[int] = typer.Option(None, "--dla", min=0, help="Build for DLA core N (GPU fallback on)."),
        max_batch: int = typer.Option(8, "--max-batch", min=1, help="Largest batch of the optimization profile."),
        device: str = typer.Option("cuda:0", "--device", help="CUDA device."),
        force: bool = typer.Option(False, "--force", help="Rebuild even when the plan is up to date."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ):
        """(On the device) build this GPU's TensorRT plan into the bundle.

        \b
        Writes model.<gpu>.<tensorrt-version>.plan and records it in the manifest.
        Plans are tied to a GPU and a TensorRT version: a plan made elsewhere is
        rebuilt here, not an error. The build uses and updates the bundle's timing
        cache, then checks the plan's outputs against ONNX Runtime fp32.

        \b
        Example (Jetson Orin, INT8 from the bundle's QDQ model):
          cyto-edge build-engine cyto.cytobundle --precision int8 --workspace 2048
        """
        from cyto_edge._cli_util import print_json
        from cyto_edge.export.tensorrt import build_engine as build

        res = build(bundle, precision, workspace_mb=workspace, dla_core=dla, max_batch=max_batch, device=device,
                    force=force)
        if as_json:
            print_json(res)
        else:
            print(f"{res['plan']}: {res['status']} for {res['gpu']['name']} (TensorRT {res['gpu']['tensorrt']})")
