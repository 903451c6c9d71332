"""`cyto-edge train-classifier`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

HELP = """Train the attention cell classifier: a ResNet with SE and SAM blocks in series in stages 2-4,
a disentangled non-local block in stage 5, and the pooled features of stages 3-5 concatenated.

Data, one of:
  --data DIR               SIPaKMeD layout (im_<Class>/, NNN.bmp + NNN_cytKK.dat, CROPPED/) or class
                           folders (DIR/<class>/*.png|jpg|bmp)
  --from-detection DIR     a detection set (COCO, VOC, ...): one crop around every box (--context),
                           plus --background N crops per image of the class 'normal' (away from boxes)

Crops of any size are resized to --img-size; gray, 16-bit and RGBA images are converted to 8-bit RGB.
Examples:

  cyto-edge train-classifier --data SIPaKMeD --arch resnet50 --folds 5 --epochs 80 --optimizer sgd --lr 0.01
  cyto-edge train-classifier --from-detection data/synth --arch small --img-size 64 --background 2
  cyto-edge train-classifier --data crops/ --no-dnl --out runs/clf_se_sam      (an ablation row)

Writes OUT/classifier.pt (weights, classes, Bethesda mapping, input size, mean/std, crop geometry),
metrics.json (accuracy, per-class precision/recall/F1, confusion matrix) and confusion.png. With
--folds K (the paper's 5-fold cross-validation) every fold is trained and tested on its held-out part:
foldK.pt and confusion_foldK.png, and the mean and std of the accuracy; train the model you deploy on
all the data with --folds 1. --bundle checks that the classes are the detector bundle's (the runtime
reclassifies its detections by class name); put it in the bundle with
`cyto-edge add-stage OUT/classifier.pt BUNDLE`.
"""


def register(app: typer.Typer) -> None:
    @app.command("train-classifier", help=HELP)
    def train_classifier(
        data: Optional[Path] = typer.Option(None, "--data", help="SIPaKMeD-layout or class-folder directory."),
        from_detection: Optional[Path] = typer.Option(None, "--from-detection", help="Detection set to cut crops from."),
        split: Optional[str] = typer.Option(None, "--split", help="Split of the detection set (default: train)."),
        mapping: Optional[Path] = typer.Option(None, "--mapping", help="Class-mapping file (class -> Bethesda)."),
        arch: str = typer.Option("small", "--arch", help="resnet50 (the paper's), resnet18, or small (edge)."),
        width: Optional[int] = typer.Option(None, "--width", help="Base width (default: the architecture's)."),
        se: bool = typer.Option(True, "--se/--no-se", help="Squeeze-and-excitation in stages 2-4."),
        sam: bool = typer.Option(True, "--sam/--no-sam", help="Spatial attention in stages 2-4."),
        dnl: bool = typer.Option(True, "--dnl/--no-dnl", help="Disentangled non-local block in stage 5."),
        folds: int = typer.Option(1, "--folds", help="K-fold cross-validation (the paper: 5); 1: one split."),
        val_fraction: float = typer.Option(0.2, "--val-fraction", help="Validation share with --folds 1."),
        epochs: int = typer.Option(30, "--epochs", help="Epochs (the paper: 80)."),
        batch: int = typer.Option(48, "--batch", help="Crops per step (the paper: 48)."),
        lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (warm-up, then cosine)."),
        optimizer: str = typer.Option("adamw", "--optimizer", help="adamw or sgd (momentum 0.9)."),
        img_size: int = typer.Option(80, "--img-size", help="Crop side fed to the network (the paper: 80)."),
        context: float = typer.Option(0.25, "--context", help="Margin around a box, fraction of its longer side."),
        background: int = typer.Option(0, "--background", help="'normal' crops per image (--from-detection)."),
        bundle: Optional[Path] = typer.Option(None, "--bundle", help="Detector bundle whose classes must match."),
        out: Path = typer.Option(Path("runs/classifier"), "--out", help="Output directory."),
        seed: int = typer.Option(0, "--seed"),
        threads: int = typer.Option(0, "--threads", help="Torch threads (0: default)."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ):
        from cyto_edge.train.classify import ClassifierSettings

        s = ClassifierSettings(arch=arch, se=se, sam=sam, dnl=dnl, width=width, img_size=img_size, epochs=epochs,
                               batch=batch, lr=lr, optimizer=optimizer, folds=folds, val_fraction=val_fraction,
                               seed=seed, threads=threads)
        run(s, data, from_detection, split, mapping, context, background, bundle, out, json_out)


def _crops(data, from_detection, split, mapping, size: int, context: float, background: int, seed: int, quiet: bool):
    from cyto_edge.errors import BadInput
    from cyto_edge.train import cellcrops
    from cyto_edge.train.classify import Steps
    from cyto_edge.train.data.load import load_classification, load_detection

    if (data is None) == (from_detection is None):
        raise BadInput("give exactly one of --data (crops / SIPaKMeD) or --from-detection (a detection set)")
    if context < 0 or background < 0:
        raise BadInput("--context and --background must be >= 0")
    spec = cellcrops.CropSpec(context=context)
    with Steps(not quiet) as bar:
        if data is not None:
            ds = load_classification(data, mapping)
            tick = bar.task("crops", len(ds.items))
            return cellcrops.from_classification(ds, size, spec, progress=lambda i, n: tick())
        ds = load_detection(from_detection, split, mapping)
        tick = bar.task("crops", len(ds.images))
        return cellcrops.from_detection(ds, size, spec, background, seed, progress=lambda i, n: tick())


def run(s, data, from_detection, split, mapping, context, background, bundle, out, json_out) -> dict:
    from cyto_edge.train.classify import train_classifier

    s.check()
    crops = _crops(data, from_detection, split, mapping, s.img_size, context, background, s.seed, json_out)
    if bundle is not None:
        from cyto_edge.export.second_stage import check_classes
        from cyto_edge.runtime.bundle import Bundle

        b = Bundle.open(bundle, verify=False)
        check_classes({"kind": "classifier", "classes": crops.classes, "bethesda": crops.bethesda},
                      b.classes, dict(b.manifest.bethesda))
    summary = train_classifier(crops, s, out, progress=not json_out)
    summary["warnings"] = crops.warnings
    if json_out:
        from cyto_edge._cli_util import print_json

        print_json({k: v for k, v in summary.items() if k != "per_fold"} | {"out": str(out)})
    else:
        _print(summary, out)
    return summary


def _print(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for w in summary.get("warnings", []):
        con.print(f"[yellow]warning[/yellow]: {w}", highlight=False)
    rep = summary["pooled"]
    if rep is None:
        con.print(f"trained on every crop (no held-out data); checkpoint in {out}")
        return
    t = Table(title="held-out crops" + (f" over {summary['folds']} folds" if summary["folds"] > 1 else ""))
    for col in ("class", "precision", "recall", "F1", "n"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for c, m in rep["per_class"].items():
        t.add_row(c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    con.print(t)
    acc = f"{summary['accuracy_mean']:.4f}" + (f" ± {summary['accuracy_std']:.4f}" if summary["folds"] > 1 else "")
    con.print(f"accuracy {acc}, macro F1 {rep['macro_f1']:.4f}, {summary['params']:,} parameters; "
              f"checkpoint and confusion.png in {out}", highlight=False)
