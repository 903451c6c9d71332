"""`cyto-edge train-grader`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

HELP = """Train the learned FOV grader from FOV-level labels only (no cell labels): cell features from
a small CNN, an attention BiLSTM over the cells (global context), a transformer over each cell's
feature map (local), cross attention between the two, and class branches trained on the cells with the
highest and lowest cross-attention scores (L = L_ROI + lambda * L_cell).

Labels: each image's truth.fov_grade (written by `cyto-edge synth`), or --labels CSV with columns
file,grade (grade: NILM, ASC-US, LSIL, ASC-H, AGC, HSIL, SCC). Cells, --cells:
  nuclei   the --max-cells largest nuclei found by the torch-free nuclei finder (the device runs the same
           code), a window of --window-um µm around each (default)
  gt       the dataset's boxes (e.g. a detector's output saved as COCO), with a 25% margin

Examples:

  cyto-edge train-grader --data data/synth --test-split test --out runs/grader
  cyto-edge train-grader --data fovs/ --labels grades.csv --um-per-px 0.5 --grades NILM,LSIL,HSIL
  cyto-edge train-grader --data data/synth --merge ASC-US=LSIL,ASC-H=HSIL,AGC=HSIL,SCC=HSIL   (3 grades)
  cyto-edge train-grader --data data/synth --backbone runs/classifier/classifier.pt --freeze-backbone

Writes OUT/grader.pt (weights, grades, preprocessing, how cells are chosen), metrics.json (accuracy,
per-grade precision/recall/F1, sensitivity and specificity of >= LSIL) and confusion.png. Put it in the
bundle with `cyto-edge add-stage OUT/grader.pt BUNDLE` (ONNX: FOV probabilities and per-cell
cross-attention scores).
"""


def register(app: typer.Typer) -> None:
    @app.command("train-grader", help=HELP)
    def train_grader(
        data: Path = typer.Option(..., "--data", help="Detection set (COCO directory or .json, ...)."),
        split: Optional[str] = typer.Option(None, "--split", help="Training split (default: train)."),
        labels: Optional[Path] = typer.Option(None, "--labels", help="CSV file,grade (instead of truth.fov_grade)."),
        test_split: Optional[str] = typer.Option(None, "--test-split", help="Also report on this split (e.g. test)."),
        cells: str = typer.Option("nuclei", "--cells", help="nuclei or gt (see above)."),
        max_cells: int = typer.Option(48, "--max-cells", help="Cells per FOV at most."),
        crop: int = typer.Option(64, "--crop", help="Cell crop side fed to the CNN (px)."),
        window_um: float = typer.Option(64.0, "--window-um", help="Window around a nucleus (µm)."),
        um_per_px: Optional[float] = typer.Option(None, "--um-per-px", help="Image scale when the set does not record it."),
        grades: Optional[str] = typer.Option(None, "--grades", help="Keep only FOVs of these grades, e.g. NILM,LSIL,HSIL."),
        merge: Optional[str] = typer.Option(None, "--merge", help="Count grades as others, e.g. ASC-US=LSIL,SCC=HSIL."),
        width: int = typer.Option(16, "--width", help="CNN base width."),
        hidden: int = typer.Option(64, "--hidden", help="LSTM units per direction."),
        vit_dim: int = typer.Option(64, "--vit-dim", help="Transformer width D."),
        vit_layers: int = typer.Option(2, "--vit-layers", help="Transformer layers L."),
        local: bool = typer.Option(True, "--local/--no-local", help="Transformer + cross attention (off: Att-BLSTM alone)."),
        peephole: bool = typer.Option(True, "--peephole/--no-peephole", help="Eq. 1's peephole terms (off: OpenVINO-friendly LSTM)."),
        lam: float = typer.Option(0.25, "--lambda-cell", help="Weight of the cell loss (the paper: 0.25; 0: off)."),
        backbone: Optional[Path] = typer.Option(None, "--backbone", help="Cell-classifier checkpoint for the CNN."),
        freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Keep the --backbone weights fixed."),
        epochs: int = typer.Option(20, "--epochs"),
        batch: int = typer.Option(8, "--batch", help="FOVs per step."),
        lr: float = typer.Option(1e-3, "--lr"),
        val_fraction: float = typer.Option(0.25, "--val-fraction", help="Validation share (picks the epoch)."),
        out: Path = typer.Option(Path("runs/grader"), "--out", help="Output directory."),
        seed: int = typer.Option(0, "--seed"),
        threads: int = typer.Option(0, "--threads", help="Torch threads (0: default)."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ):
        from cyto_edge.errors import BadInput
        from cyto_edge.train.grade_train import GraderSettings, parse_grade, parse_merge

        if min(max_cells, crop, epochs, batch, width, hidden, vit_dim, vit_layers) < 1 or window_um <= 0:
            raise BadInput("--max-cells, --crop, --epochs, --batch and the model sizes must be >= 1, --window-um > 0")
        if crop < 16:
            raise BadInput(f"--crop {crop} is too small; use at least 16 px")
        if vit_dim % 4:
            raise BadInput(f"--vit-dim {vit_dim} must be a multiple of 4 (the transformer's heads)")
        if backbone is None and freeze_backbone:
            raise BadInput("--freeze-backbone needs --backbone CKPT")
        keep = [parse_grade(g, "--grades") for g in grades.split(",")] if grades else None
        s = GraderSettings(
            cells=cells, max_cells=max_cells, crop=crop, window_um=window_um, um_per_px=um_per_px, grades=keep,
            merge=parse_merge(merge), width=width, hidden=hidden, vit_dim=vit_dim, vit_layers=vit_layers,
            local=local, lam=lam, peephole=peephole, epochs=epochs, batch=batch, lr=lr, val_fraction=val_fraction,
            seed=seed, threads=threads, backbone_ckpt=str(backbone) if backbone else None,
            freeze_backbone=freeze_backbone)
        run(s, data, split, labels, test_split, out, json_out)


def run(s, data: Path, split, labels, test_split, out: Path, json_out: bool) -> dict:
    from cyto_edge.train.data.load import load_detection
    from cyto_edge.train.grade_train import build_fovset, fov_grades, train_grader

    ds = load_detection(data, split, um_per_px=s.um_per_px)
    fs = build_fovset(ds, fov_grades(ds, labels), s, progress=not json_out)
    test = None
    if test_split:
        tds = load_detection(data, test_split, um_per_px=s.um_per_px)
        test = build_fovset(tds, fov_grades(tds, labels), s, progress=not json_out)
    summary = train_grader(fs, s, out, progress=not json_out, test=test)
    summary["warnings"] = fs.warnings
    if json_out:
        from cyto_edge._cli_util import print_json

        print_json(summary | {"out": str(out)})
    else:
        _print(summary, out)
    return summary


def _print(summary: dict, out: Path) -> None:
    from rich.console import Console

    con = Console()
    for w in summary.get("warnings", []):
        con.print(f"[yellow]warning[/yellow]: {w}", highlight=False)
    con.print(f"{summary['fovs']} FOVs, {summary['cells_per_fov']} cells per FOV on average, grades "
              f"{', '.join(summary['classes'])}; {summary['params']:,} parameters", highlight=False)
    for part in ("val", "test"):
        r = summary.get(part)
        if isinstance(r, dict):
            con.print(f"{part}: accuracy {r['accuracy']:.4f}, macro F1 {r['macro_f1']:.4f}, >= LSIL sensitivity "
                      f"{r['sensitivity']} specificity {r['specificity']} (n={r['n']})", highlight=False)
    con.print(f"checkpoint, metrics.json and confusion.png in {out}", highlight=False)
