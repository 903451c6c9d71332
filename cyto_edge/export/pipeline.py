"""`cyto-edge export`: a checkpoint -> a verified model bundle for one target.

    summary = export_bundle("runs/student/best.pt", ExportOptions(target="openvino", precision="int8",
                                                                  out=Path("cyto.cytobundle")))

The target decides the files (TARGETS):
    cpu       model.onnx (+ model.int8.onnx with --precision int8)            ONNX Runtime
    rpi       model.onnx + model.int8.onnx                                   ONNX Runtime int8 on ARM
    openvino  model.onnx + openvino/model.xml (FP32) (+ model.fp16.xml | model.int8.onnx + model.int8.xml)
    jetson    model.onnx (+ model.int8.onnx), linted for TensorRT 10; the plan is built on the device
Steps (each shown with its progress): ONNX fp32 -> [TensorRT lint] -> [calibration tiles -> QAT ->
quantize -> QDQ coverage >= 95%] -> [OpenVINO IR] -> the acceptance gate (export/verify.py) on validation
images -> manifest with quality per file. A file outside its tolerance: CheckFailed (exit 1); the
bundle stays on disk with the figures and `quality.gate.passed = false` (`bundle verify` refuses it).
"""
from __future__ import annotations

import shlex
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from cyto_edge.errors import BadInput, CheckFailed
from cyto_edge.export.bundle_writer import add_file, start_bundle
from cyto_edge.runtime.bundle import Bundle, write_manifest

TARGETS = {"cpu": ("fp32", "int8"), "rpi": ("int8",), "openvino": ("fp32", "fp16", "int8"),
           "jetson": ("fp16", "int8", "fp32")}
MIN_QDQ_FRACTION = 0.95


@dataclass
class ExportOptions:
    target: str
    out: Path
    precision: str | None = None       # None: the target's first precision
    calib: Path | None = None          # dataset for calibration (its train split); None: the checkpoint's
    calib_images: int = 64             # model-input tiles used for calibration
    calib_method: str = "minmax"
    qat_epochs: int = 0
    accept_drop: float | None = None   # allowed int8 mAP@0.5 drop (0.02 = 2 points) instead of 1 point
    val: Path | None = None            # dataset for the gate (its val split, else test); None: the checkpoint's
    val_images: int = 16
    opset: int = 18
    threads: int = 2
    seed: int = 0
    qat_steps: int | None = None       # QAT steps per epoch; None: the recipe's steps_per_epoch

    def resolved_precision(self) -> str:
        if self.target not in TARGETS:
            raise BadInput(f"--target {self.target!r} must be one of {', '.join(TARGETS)}")
        p = self.precision or TARGETS[self.target][0]
        if p not in TARGETS[self.target]:
            raise BadInput(f"--precision {p} is not available for --target {self.target} "
                           f"(choose {', '.join(TARGETS[self.target])})")
        return p


class Steps:
    """One line per step on stderr: spinner, name, bar when the step counts something, elapsed time."""

    def __init__(self, console=None, enabled: bool = True):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console or Console(stderr=True), disable=not enabled)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    @contextmanager
    def step(self, desc: str, total: int | None = None):
        t = self.progress.add_task(desc, total=total)
        yield lambda n=1, **kw: self.progress.advance(t, n)
        done = next(x for x in self.progress.tasks if x.id == t).completed
        self.progress.update(t, total=total or max(done, 1), completed=total or max(done, 1),
                             description=f"[green]done[/] {desc}")


def _datasets(ck: dict, opts: ExportOptions):
    """(calibration DetectionDataset: train images, validation DetectionDataset, where each came from)."""
    from cyto_edge.train.data.load import load_detection

    train = val = None
    src = {}
    if opts.calib is None or opts.val is None:
        from cyto_edge.train.config import TrainConfig
        from cyto_edge.train.loop import load_data

        cfg = TrainConfig.model_validate(ck["config"])
        if not Path(cfg.data.root).exists():
            raise BadInput(f"the checkpoint's training data {cfg.data.root} is not here; "
                           "pass --calib DATA and --val DATA")
        _, train, val = load_data(cfg)
        src = {"calib": f"{cfg.data.root} (train part of the checkpoint's split)",
               "val": f"{cfg.data.root} (the checkpoint's validation split, seed {cfg.data.split_seed})"}
    if opts.calib is not None:
        train, src["calib"] = load_detection(opts.calib, "train"), f"{opts.calib} (train)"
    if opts.val is not None:
        try:
            val, src["val"] = load_detection(opts.val, "val"), f"{opts.val} (val)"
        except BadInput:
            val, src["val"] = load_detection(opts.val, "test"), f"{opts.val} (test)"
    if val is None or len(val.images) == 0:
        raise BadInput("no validation images for the export gate: the checkpoint was trained without a validation "
                       "split; pass --val DATA")
    return train, val, src


def _int8(out: Path, m, ck, model, train_ds, opts: ExportOptions, steps: Steps) -> dict:
    """model.int8.onnx from calibration tiles (and QAT when asked); returns its manifest meta."""
    from cyto_edge.export.calibration import calibration_tiles
    from cyto_edge.export.quantize import SETTINGS, export_int8, qdq_coverage

    with steps.step(f"calibration tiles ({opts.calib_images})"):
        tiles = calibration_tiles(train_ds, m, opts.calib_images, seed=opts.seed)
    src, overrides, qat = out / "model.onnx", None, None
    with tempfile.TemporaryDirectory(prefix="cyto-qat-") as tmp:
        if opts.qat_epochs > 0:
            src, overrides, qat = _qat(ck, model, train_ds, opts, steps, Path(tmp))
        with steps.step(f"INT8 QDQ ({opts.calib_method} calibration)"):
            export_int8(src, out / "model.int8.onnx", tiles, opts.calib_method, overrides)
    cov = qdq_coverage(out / "model.int8.onnx")
    if cov["fraction"] < MIN_QDQ_FRACTION:
        raise CheckFailed(f"{out / 'model.int8.onnx'}: only {cov['fraction']:.0%} of Conv/Gemm weights are in QDQ "
                          f"form (< {MIN_QDQ_FRACTION:.0%}); not quantized: {', '.join(cov['not_quantized'])}")
    return {"calib_method": opts.calib_method, "calib_tiles": int(len(tiles)), "qdq": cov, **SETTINGS,
            **({"qat": qat} if qat else {})}


def _qat(ck, model, train_ds, opts: ExportOptions, steps: Steps, tmp: Path):
    import copy

    from cyto_edge.export.onnx import export_onnx
    from cyto_edge.export.qat import input_overrides, qat_finetune

    if hasattr(model, "rescore_weight"):
        raise BadInput("--qat-epochs: quantization-aware fine-tuning of a detector with a MIL head is not supported; "
                       "use post-training quantization (--qat-epochs 0)")
    sched, optim = ck["config"]["schedule"], ck["config"]["optim"]
    spe, bs = int(opts.qat_steps or sched["steps_per_epoch"]), int(optim["batch_size"])
    lr = float(optim["lr"]) / 10
    with steps.step(f"quantization-aware fine-tuning ({opts.qat_epochs} epochs)", total=opts.qat_epochs * spe) as adv:
        tuned, ranges = qat_finetune(copy.deepcopy(model), train_ds, epochs=opts.qat_epochs, steps_per_epoch=spe,
                                     batch_size=bs, lr=lr, um_per_px=ck["um_per_px"], seed=opts.seed,
                                     progress=lambda loss: adv())
        src = export_onnx(tuned, tmp / "qat.onnx", opset=opts.opset)
    overrides = input_overrides(src, ranges)
    return src, overrides, {"epochs": opts.qat_epochs, "steps": opts.qat_epochs * spe, "lr": lr, "batch_size": bs,
                            "pinned_input_ranges": len(overrides)}


def _openvino(out: Path, m, precision: str, steps: Steps) -> None:
    from cyto_edge.export.openvino import IR_NAMES, export_openvino

    wanted = ["fp32"] + ([{"fp16": "fp16", "int8": "int8-qdq"}[precision]] if precision != "fp32" else [])
    with steps.step(f"OpenVINO IR ({', '.join(wanted)})", total=len(wanted)) as adv:
        for p in wanted:
            src = out / ("model.int8.onnx" if p == "int8-qdq" else "model.onnx")
            xml = export_openvino(src, out / IR_NAMES[p], p)
            add_file(out, m, IR_NAMES[p], "openvino-xml", p, source=src.name)
            add_file(out, m, str(xml.with_suffix(".bin").relative_to(out)), "openvino-bin", p, source=src.name)
            adv()


def export_bundle(ckpt_path: str | Path, opts: ExportOptions, console=None, show_progress: bool = True,
                  check: bool = True) -> dict:
    """Export, verify and write the bundle; returns the summary. A file outside its tolerance raises
    CheckFailed (with `check=False`: the summary's "failed" lists them and `raise_failures` raises later)."""
    import torch

    from cyto_edge.export.onnx import export_onnx, onnx_opset
    from cyto_edge.export.trt_lint import check_onnx
    from cyto_edge.train.checkpoint import load_checkpoint
    from cyto_edge.train.mil import inference_model_from_checkpoint

    precision = opts.resolved_precision()
    torch.set_num_threads(max(1, opts.threads))
    ck = load_checkpoint(ckpt_path)
    model = inference_model_from_checkpoint(ck)
    train_ds, val_ds, data_src = _datasets(ck, opts)
    with Steps(console, show_progress) as steps:
        out, m = start_bundle(Path(opts.out), ck, Path(ckpt_path))
        with steps.step(f"ONNX fp32 (opset {opts.opset})"):
            export_onnx(model, out / "model.onnx", opset=opts.opset)
        add_file(out, m, "model.onnx", "onnx", "fp32", opset=onnx_opset(out / "model.onnx"))
        if opts.target == "jetson":
            with steps.step("TensorRT lint of model.onnx"):
                check_onnx(out / "model.onnx")
        if precision == "int8":
            meta = _int8(out, m, ck, model, train_ds, opts, steps)
            add_file(out, m, "model.int8.onnx", "onnx", "int8-qdq", opset=onnx_opset(out / "model.int8.onnx"), **meta)
            if opts.target == "jetson":
                with steps.step("TensorRT lint of model.int8.onnx"):
                    check_onnx(out / "model.int8.onnx")
        if opts.target == "openvino":
            _openvino(out, m, precision, steps)
        quality = _gate(out, m, ck, model, val_ds, opts, steps)
    m.provenance["export"] = {"target": opts.target, "precision": precision, "data": data_src,
                              "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
                              "command": _command()}
    write_manifest(out, m)
    summary = _summary(out, m, quality)
    if check:
        raise_failures(summary)
    return summary


def _command() -> str | None:
    """The command line, when export runs as `cyto-edge export` (not from Python)."""
    argv = sys.argv or [""]
    return shlex.join(["cyto-edge", *argv[1:]]) if Path(argv[0]).name == "cyto-edge" else None


def _gate(out: Path, m, ck, model, val_ds, opts: ExportOptions, steps: Steps) -> dict:
    import torch

    from cyto_edge.export.verify import TOLERANCES, gate_files, run_images, settings_for
    from cyto_edge.train.evaluate import torch_infer

    write_manifest(out, m)
    b = Bundle.open(out)
    s = settings_for(val_ds, m, opts.val_images)
    n_files = sum(1 for f in m.files if f.role == "detector" and f.kind in ("onnx", "openvino-xml"))
    with steps.step(f"acceptance gate: torch + {n_files} file(s) on {len(s.images)} validation images",
                    total=len(s.images) * (n_files + 1)) as adv:
        ref = run_images(torch_infer(model, torch.device("cpu")), m, b.priors(), s, adv)
        files = gate_files(b, ref, s, accept_drop=opts.accept_drop, threads=opts.threads, progress=adv)
    gate = {"passed": all(q["passed"] for q in files.values()), "val_images": len(s.images),
            "accept_drop": opts.accept_drop, "tolerances": {k: asdict(v) for k, v in TOLERANCES.items()}}
    m.quality.update({"torch_val_map50": ref.map50, "checkpoint_best_map50": ck.get("best_map50"),
                      "gate": gate, "files": files})
    return m.quality


def _summary(out: Path, m, quality: dict) -> dict:
    files = {f.path: {"kind": f.kind, "precision": f.precision, "size": f.size} for f in m.files}
    failed = {p: q["reason"] for p, q in quality["files"].items() if not q["passed"]}
    exp = m.provenance.get("export", {})
    return {"bundle": str(out), "target": exp.get("target"), "precision": exp.get("precision"), "files": files,
            "quality": quality, "failed": failed}


def raise_failures(summary: dict) -> None:
    """CheckFailed naming the first file outside its tolerance (exit 1), if any."""
    failed = summary["failed"]
    if failed:
        p, why = next(iter(failed.items()))
        more = f" (and {len(failed) - 1} more file(s))" if len(failed) > 1 else ""
        raise CheckFailed(f"{Path(summary['bundle']) / p}: fails the export gate: {why}{more}; "
                          "the bundle is marked failed")


def reverify(bundle_dir: str | Path, ckpt_path: str | Path, opts: ExportOptions, check: bool = True) -> dict:
    """Run the acceptance gate again on an existing bundle (its files as they are now) against the checkpoint;
    records the figures in its manifest like `export` does and returns the summary."""
    from cyto_edge.train.checkpoint import load_checkpoint
    from cyto_edge.train.mil import inference_model_from_checkpoint

    b = Bundle.open(bundle_dir)
    ck = load_checkpoint(ckpt_path)
    model = inference_model_from_checkpoint(ck)
    _, val_ds, _ = _datasets(ck, opts)
    with Steps(None, False) as steps:
        quality = _gate(b.path, b.manifest, ck, model, val_ds, opts, steps)
    write_manifest(b.path, b.manifest)
    summary = _summary(b.path, b.manifest, quality)
    if check:
        raise_failures(summary)
    return summary
