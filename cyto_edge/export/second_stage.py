"""Second-stage models as ONNX: the attention cell classifier and the learned FOV grader.

    path = export_classifier("runs/classifier/classifier.pt", "out/classifier.onnx")
    stage = stage_info(path)                 # the dict the bundle manifest keeps under stages.classifier
    add_to_bundle("model.cytobundle", path)  # copies the file in, checks classes, re-hashes the manifest

or, from a shell, `cyto-edge add-stage runs/classifier/classifier.pt model.cytobundle` (export_stage +
add_to_bundle).

Each export is verified against torch with ONNX Runtime (CPU) on random inputs; the largest absolute
difference is recorded in the stage dict (`max_abs_diff`) and an export above `TOLERANCE` fails
(CheckFailed). The stage dict travels inside the ONNX file (metadata_props key `cyto_edge.stage`, JSON).

I/O contract (opset 17, float32, NCHW; N is a dynamic axis):

Cell classifier, role "classifier":
  input  `crops`  (N, 3, S, S), N >= 1: RGB crops, x = (pixel * scale - mean) / std (stage["input"]).
  output `probs`  (N, K): class probabilities in the order of stage["classes"]; stage["bethesda"] maps
                  each class to its Bethesda category ("normal", when present, is the background class).
  Crop geometry (stage["crop"]; null: the model was trained on whole crop images, resized): for a box
  (x1, y1, x2, y2) in pixels at the bundle's scale, the square centred on the box with side
  `fixed_side` px if set, else max(w, h) * (1 + 2 * context); pixels outside the frame repeat the
  border; resized to S x S (INTER_AREA shrinking, INTER_LINEAR enlarging). Reference implementation:
  cyto_edge.train.cellcrops.cut_crop (numpy + OpenCV).

Learned FOV grader, role "grader":
  input  `cells`  (N, 3, S, S), N >= 0: the FOV's cells, preprocessed like the classifier's crops, in
                  raster order of their centres (rows of stage["cells"]["row_px"] px, then left to
                  right; cellcrops.raster_order). Which cells: stage["cells"] (e.g. source "nuclei": the
                  `max_cells` largest nuclei of runtime.nuclei.segment_nuclei, window `fixed_side` px).
  outputs `fov_probs`   (1, C): FOV class probabilities; stage["classes"] are Bethesda categories from
                        least to most severe. N = 0 gives NILM 2/(C+1), every other class 1/(C+1).
          `cell_scores` (N,): each cell's cross-attention score (eq. 9; sums to 1 for N >= 1), the
                        attention the grade paid to the cell: store it and show it beside the cell.
          `cell_probs`  (N, C): per-cell in-the-class probability of each class branch (weakly
                        supervised cell classification); present only when stage["outputs"] lists it.
  The grader's LSTM is one ONNX LSTM node with peephole weights (input P): ONNX Runtime runs it exactly.
  OpenVINO (2026.4) does not apply P: a standalone peephole LSTM differed by 0.39, so stage["runtimes"]
  lists only ONNX Runtime; a grader trained with `train-grader --no-peephole` matched ONNX Runtime to
  ~1e-3 in OpenVINO (not verified by export).
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cyto_edge.errors import BadInput, CheckFailed
from cyto_edge.runtime.taxonomy import BETHESDA_ORDER, SEVERITY

OPSET = 17
TOLERANCE = 1e-4          # max |onnx - torch| on probabilities / scores
META_KEY = "cyto_edge.stage"
FILE_NAMES = {"classifier": "classifier.onnx", "grader": "grader.onnx"}


class _ClassifierExport(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, crops: torch.Tensor) -> torch.Tensor:      # (N, 3, S, S) -> (N, K)
        return self.model(crops).softmax(-1)


class _GraderExport(nn.Module):
    """One FOV. A zero cell is appended (masked out) so that N = 0 never makes an empty batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, cells: torch.Tensor):                       # (N, 3, S, S)
        n = cells.shape[0]
        ext = torch.cat([cells, cells.new_zeros(1, *cells.shape[1:])], 0)   # (N+1, 3, S, S)
        x, y = self.model.encode(ext)
        mask = (torch.arange(ext.shape[0]) < n)[None]             # (1, N+1)
        out = self.model.head_forward(x[None], None if y is None else y[None], mask)
        res = (out["probs"], out["cell_scores"][0, :n])
        if "cell_logits" in out:
            res += (out["cell_logits"][0, :n].softmax(-1)[..., 1],)   # (N, C)
        return res


def _export(wrapper: nn.Module, example: torch.Tensor, out: Path, in_name: str, out_names: list[str]) -> None:
    axes = {in_name: {0: "N"}, **{o: {0: "N"} for o in out_names if o not in ("fov_probs",)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), str(out), dynamo=False, opset_version=OPSET,
                          input_names=[in_name], output_names=out_names, dynamic_axes=axes,
                          do_constant_folding=True)


def _max_diff(wrapper: nn.Module, out: Path, in_name: str, inputs: list[torch.Tensor]) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            ref = wrapper(x)
            ref = ref if isinstance(ref, tuple) else (ref,)
            got = sess.run(None, {in_name: x.numpy()})
            for r, g in zip(ref, got):
                if tuple(r.shape) != g.shape:
                    raise CheckFailed(f"{out}: ONNX output shape {g.shape} != torch {tuple(r.shape)} for input "
                                      f"{tuple(x.shape)}")
                if g.size:
                    if not np.isfinite(g).all():
                        raise CheckFailed(f"{out}: ONNX output has non-finite values for input {tuple(x.shape)}")
                    worst = max(worst, float(np.abs(r.numpy() - g).max()))
    return worst


def _finish(out: Path, stage: dict, diff: float) -> Path:
    import onnx

    if diff > TOLERANCE:
        raise CheckFailed(f"{out}: ONNX Runtime differs from torch by {diff:.2e} (> {TOLERANCE:g})")
    stage["max_abs_diff"] = diff
    stage["opset"] = OPSET
    m = onnx.load(str(out))
    del m.metadata_props[:]
    m.metadata_props.add(key=META_KEY, value=json.dumps(stage))
    onnx.save(m, str(out))
    return out


def export_classifier(ckpt: str | Path, out_path: str | Path, *, seed: int = 0) -> Path:
    """Cell-classifier checkpoint -> verified ONNX (input `crops` (N,3,S,S) -> `probs` (N,K))."""
    from cyto_edge.train.classify import load_checkpoint

    model, meta = load_checkpoint(ckpt)
    wrapper = _ClassifierExport(model).eval()
    S = meta["input"]["size"]
    out = Path(out_path)
    g = torch.Generator().manual_seed(seed)
    _export(wrapper, torch.randn(2, 3, *S, generator=g), out, "crops", ["probs"])
    diff = _max_diff(wrapper, out, "crops", [torch.randn(n, 3, *S, generator=g) for n in (1, 3, 8)])
    stage = {"kind": "classifier", "file": FILE_NAMES["classifier"], "classes": meta["classes"],
             "bethesda": meta.get("bethesda"), "input": meta["input"], "crop": meta.get("crop"),
             "inputs": {"crops": ["N", 3, *S]}, "outputs": {"probs": ["N", len(meta["classes"])]},
             "arch": meta["arch"], "arch_kw": meta["arch_kw"], "runtimes": ["onnxruntime"],
             "metrics": _accuracy(meta.get("metrics") or {})}
    return _finish(out, stage, diff)


def _accuracy(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("accuracy", "macro_f1", "n", "sensitivity", "specificity") if k in metrics}


def export_grader(ckpt: str | Path, out_path: str | Path, *, seed: int = 0) -> Path:
    """FOV-grader checkpoint -> verified ONNX (`cells` (N,3,S,S) -> fov_probs, cell_scores[, cell_probs]),
    checked for N = 0, 1 and several."""
    from cyto_edge.train.grade_train import load_grader

    model, meta = load_grader(ckpt)
    wrapper = _GraderExport(model).eval()
    S = meta["input"]["size"]
    C = len(meta["classes"])
    names = ["fov_probs", "cell_scores"] + (["cell_probs"] if model.cfg.local else [])
    out = Path(out_path)
    g = torch.Generator().manual_seed(seed)
    _export(wrapper, torch.randn(3, 3, *S, generator=g), out, "cells", names)
    diff = _max_diff(wrapper, out, "cells", [torch.randn(n, 3, *S, generator=g) for n in (0, 1, 2, 7, 19)])
    shapes = {"fov_probs": [1, C], "cell_scores": ["N"], "cell_probs": ["N", C]}
    stage = {"kind": "grader", "file": FILE_NAMES["grader"], "classes": meta["classes"], "input": meta["input"],
             "crop": meta["crop"], "cells": meta["cells"], "inputs": {"cells": ["N", 3, *S]},
             "outputs": {n: shapes[n] for n in names}, "config": meta["config"],
             "empty_fov": {"grade": meta["classes"][0], "probability": round(2 / (C + 1), 6)},
             "runtimes": ["onnxruntime"], "metrics": _accuracy(meta.get("metrics") or {})}
    return _finish(out, stage, diff)


def stage_info(onnx_path: str | Path) -> dict:
    """The stage dict stored in an exported second-stage ONNX file."""
    import onnx

    p = Path(onnx_path)
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - unreadable file
        raise BadInput(f"{p}: not a readable ONNX file ({type(e).__name__})") from None
    for prop in m.metadata_props:
        if prop.key == META_KEY:
            return json.loads(prop.value)
    raise BadInput(f"{p}: not a cyto-edge second-stage model (no {META_KEY} metadata); export it with "
                   "export_classifier / export_grader")


def check_classes(stage: dict, classes: list[str], bethesda: dict[str, str]) -> None:
    """Refuse a second stage whose classes do not match a bundle's classes (BadInput naming them)."""
    if stage["kind"] == "classifier":
        unknown = [c for c in stage["classes"] if c not in classes and c != "normal"]
        if unknown:
            raise BadInput(f"classifier classes {unknown} are not classes of the bundle ({', '.join(classes)}); "
                           "retrain the classifier on data with the bundle's class names")
        theirs = stage.get("bethesda") or {}
        clash = [c for c in stage["classes"] if c in bethesda and c in theirs and theirs[c] != bethesda[c]]
        if clash:
            c = clash[0]
            raise BadInput(f"classifier maps {c!r} to {theirs[c]}, the bundle to {bethesda[c]}; use one mapping")
    else:
        have = {"NILM", *bethesda.values()}
        bad = [g for g in stage["classes"] if g not in SEVERITY or g not in have]
        if bad:
            raise BadInput(f"grader grades {bad} are not Bethesda categories of the bundle ({', '.join(sorted(have, key=SEVERITY.get))})")
        if list(stage["classes"]) != sorted(stage["classes"], key=BETHESDA_ORDER.index):
            raise BadInput(f"grader classes {stage['classes']} are not in Bethesda severity order")


def export_stage(src: str | Path, out_dir: str | Path) -> Path:
    """A second stage as a verified ONNX file in out_dir: a `train-classifier` or `train-grader`
    checkpoint is exported (its kind read from the checkpoint), an exported stage (.onnx) is used as it is."""
    from cyto_edge.train.classify import CKPT_FORMAT as CLASSIFIER
    from cyto_edge.train.grade_train import CKPT_FORMAT as GRADER

    p = Path(src)
    if not p.is_file():
        raise BadInput(f"{p}: no such file (a classifier.pt, grader.pt or exported stage .onnx)")
    if p.suffix == ".onnx":
        stage_info(p)                                   # refuses an ONNX file that is not a stage
        return p
    try:
        fmt = torch.load(p, map_location="cpu", weights_only=False).get("format")
    except Exception as e:  # noqa: BLE001 - any unpickling error is a bad file
        raise BadInput(f"{p}: not a readable checkpoint ({type(e).__name__})") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == CLASSIFIER:
        return export_classifier(p, out / FILE_NAMES["classifier"])
    if fmt == GRADER:
        return export_grader(p, out / FILE_NAMES["grader"])
    raise BadInput(f"{p}: not a second-stage checkpoint (format {fmt!r}); give the classifier.pt of "
                   "`cyto-edge train-classifier` or the grader.pt of `cyto-edge train-grader`")


def add_to_bundle(bundle_dir: str | Path, onnx_path: str | Path) -> dict:
    """Put an exported second stage into a bundle directory: checks its classes against the bundle's,
    copies the file (replacing any earlier one of the same role), records manifest.stages[role] and
    re-hashes the manifest. Returns the stage dict."""
    from cyto_edge.runtime.bundle import Bundle, BundleError, file_entry, write_manifest

    b = Bundle.open(bundle_dir, verify=True)
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"{bundle_dir}: second stages are added to a bundle directory, not an archive")
    stage = stage_info(onnx_path)
    role = stage["kind"]
    check_classes(stage, b.classes, dict(b.manifest.bethesda))
    name = FILE_NAMES[role]
    tmp = b.path / f".{name}.tmp"
    shutil.copyfile(onnx_path, tmp)
    tmp.replace(b.path / name)
    b.manifest.files = [f for f in b.manifest.files if f.role != role]
    b.manifest.files.append(file_entry(b.path, name, "onnx", "fp32", role=role, opset=stage.get("opset")))
    b.manifest.stages[role] = {**stage, "file": name}
    write_manifest(b.path, b.manifest, rehash=True)
    return b.manifest.stages[role]
