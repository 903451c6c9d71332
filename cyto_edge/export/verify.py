"""The acceptance gate: every exported file, run by its runtime engine, against the torch model.

On validation images, tiled exactly as on the device (runtime/tiling.detect_frame), three checks per file:
  raw      |out - ref| / max |ref| per output before decoding (loc, logits[, mil]), over the first 128
           tiles (bounded memory): its maximum for fp32 and fp16, its 99th percentile for int8
  matched  fraction of the reference detections (at the manifest's operating score threshold) found by
           the file's detections with IoU >= 0.5 and the same class (and the converse, recorded)
  map50    mAP@0.5 of the file on the validation images (runtime.metrics.evaluate_detections, decoded
           at score 0.05 like training's validation), and its drop below the torch model's
Tolerances per precision (TOLERANCES; `accept_drop` replaces the int8 mAP bound):
  fp32      raw <= 1e-4, matched >= 0.99, mAP drop <= 0.5 point
  fp16      raw <= 1e-2, matched >= 0.95, mAP drop <= 1 point
  int8-qdq  raw p99 <= 0.25 (a guard against a broken graph: int8 moves single outputs a lot, so the
            maximum says little; on the 40-epoch CPU student, mAP@0.5 0.53, its int8 file measured max
            0.84 / p99 0.062 of max |ref| on loc and 0.64 / 0.052 on logits, with a 0.8-point mAP drop),
            matched >= 0.6, mAP drop <= 1 point
The reference is always the torch fp32 model (EMA weights), so an error cannot hide in a chain of files.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.export.calibration import read_rgb, scale_factor
from cyto_edge.runtime import boxes as B
from cyto_edge.runtime.decode import Detections, PostProcess
from cyto_edge.runtime.metrics import evaluate_detections
from cyto_edge.runtime.tiling import detect_frame

EVAL_SCORE = 0.05     # decode threshold for mAP (the whole PR curve), as training's validation
MATCH_IOU = 0.5


@dataclass(frozen=True)
class Tolerance:
    raw_rel: float        # bound on quantile(|out - ref|, raw_quantile) / max |ref|, per output
    matched: float        # min fraction of reference detections matched
    map_drop: float       # max mAP@0.5 points below the reference (0.01 = 1 point)
    raw_quantile: float = 1.0   # 1.0: the maximum


TOLERANCES = {"fp32": Tolerance(1e-4, 0.99, 0.005), "fp16": Tolerance(1e-2, 0.95, 0.01),
              "int8-qdq": Tolerance(0.25, 0.6, 0.01, 0.99), "int8": Tolerance(0.25, 0.6, 0.01, 0.99)}


@dataclass
class RunResult:
    raw: list[np.ndarray]          # per output: (T, P, k) over the first GateSettings.raw_tiles tiles
    dets: list[Detections]         # per image, decoded at EVAL_SCORE, frame pixels
    map50: float | None


@dataclass
class GateSettings:
    images: list                   # ImageRecords with ground truth (boxes xyxy px, labels)
    classes: list[str]
    factor: float                  # dataset µm/px over model µm/px
    operating_score: float         # manifest postprocess.score_threshold
    batch_size: int = 8
    raw_tiles: int = 128           # raw outputs compared on the first tiles (bounded memory); detections on all
    tol: dict = field(default_factory=lambda: dict(TOLERANCES))


class _Recorder:
    """Wraps an infer function and keeps the outputs of the first `limit` tiles (detect_frame's order)."""

    def __init__(self, infer: Callable, limit: int):
        self.infer, self.outs, self.limit, self.kept = infer, [], limit, 0

    def __call__(self, x: np.ndarray):
        o = tuple(self.infer(x))
        if self.kept < self.limit:
            n = min(len(x), self.limit - self.kept)
            self.outs.append(tuple(a[:n].copy() for a in o))
            self.kept += n
        return o

    def arrays(self) -> list[np.ndarray]:
        return [np.concatenate([o[k] for o in self.outs]) for k in range(len(self.outs[0]))]


def run_images(infer: Callable, manifest, priors: np.ndarray, s: GateSettings, progress=None) -> RunResult:
    """Detect every validation image through `infer` (numpy NCHW -> outputs), as the device would."""
    rec = _Recorder(infer, s.raw_tiles)
    pp = manifest.postprocess
    cfg = PostProcess(score_threshold=EVAL_SCORE, nms_iou=pp.nms_iou, max_detections=pp.max_detections,
                      pre_nms_topk=pp.pre_nms_topk)
    inp = manifest.input
    weight = manifest.output.mil.weight if manifest.output.mil else None
    dets = []
    for im in s.images:
        dets.append(detect_frame(rec, read_rgb(im.file), input_size=inp.size[0], priors=priors,
                                 variances=manifest.output.variances, cfg=cfg, mean=inp.mean, std=inp.std,
                                 scale=inp.scale, overlap=pp.tile.overlap, factor=s.factor,
                                 batch_size=s.batch_size, edge_margin=pp.tile.edge_margin, rescore_weight=weight))
        if progress is not None:
            progress()
    m = evaluate_detections(s.images, dets, s.classes) if s.images else None
    return RunResult(rec.arrays(), dets, None if m is None or m.map50 is None else float(m.map50))


def raw_differences(out: list[np.ndarray], ref: list[np.ndarray], names: list[str],
                    quantile: float = 1.0) -> dict[str, float]:
    """Per output name: quantile(|out - ref|, q) / max |ref| (q = 1: the maximum)."""
    res = {}
    for name, a, r in zip(names, out, ref):
        if a.shape != r.shape:
            raise ValueError(f"output {name}: shape {a.shape} differs from the reference {r.shape}")
        d = np.abs(a.astype(np.float64) - r)
        v = d.max() if quantile >= 1.0 else np.quantile(d, quantile)
        res[name] = float(v / max(float(np.abs(r).max()), 1e-12))
    return res


def match_fraction(ref: list[Detections], out: list[Detections], score: float) -> tuple[float, float, int]:
    """(fraction of reference detections matched, fraction of output detections matched, reference count)."""
    hit_ref = hit_out = n_ref = n_out = 0
    for r, o in zip(ref, out):
        r = r.select(np.flatnonzero(r.scores >= score))
        o = o.select(np.flatnonzero(o.scores >= score))
        n_ref, n_out = n_ref + len(r), n_out + len(o)
        if len(r) == 0 or len(o) == 0:
            continue
        iou = B.iou(r.boxes, o.boxes) * (r.labels[:, None] == o.labels[None, :])   # (R, O)
        taken = np.zeros(len(o), bool)
        for i in np.argsort(-r.scores, kind="stable"):
            cand = np.where(taken, -1.0, iou[i])
            j = int(np.argmax(cand))
            if cand[j] >= MATCH_IOU:
                taken[j] = True
                hit_ref += 1
        hit_out += int(taken.sum())
    return (hit_ref / n_ref if n_ref else 1.0), (hit_out / n_out if n_out else 1.0), n_ref


def judge(precision: str, ref: RunResult, out: RunResult, names: list[str], s: GateSettings,
          accept_drop: float | None = None) -> dict:
    """The quality record of one file: figures, its tolerance and `passed` with the reason when it fails."""
    tol = s.tol[precision]
    if accept_drop is not None and precision.startswith("int8"):
        tol = Tolerance(tol.raw_rel, tol.matched, float(accept_drop), tol.raw_quantile)
    raw = raw_differences(out.raw, ref.raw, names)
    raw_q = raw if tol.raw_quantile >= 1.0 else raw_differences(out.raw, ref.raw, names, tol.raw_quantile)
    m_ref, m_out, n_ref = match_fraction(ref.dets, out.dets, s.operating_score)
    drop = None if ref.map50 is None or out.map50 is None else ref.map50 - out.map50
    stat = "max" if tol.raw_quantile >= 1.0 else f"p{100 * tol.raw_quantile:g}"
    fails = [f"{k} {stat} |diff| {v:.3g} x max |ref| > {tol.raw_rel:g}" for k, v in raw_q.items() if v > tol.raw_rel]
    if n_ref and m_ref < tol.matched:
        fails.append(f"matched {m_ref:.3f} of {n_ref} torch detections < {tol.matched:g}")
    if drop is not None and drop > tol.map_drop + 1e-9:
        fails.append(f"mAP@0.5 {out.map50:.4f} is {100 * drop:.2f} points below torch {ref.map50:.4f} "
                     f"(allowed {100 * tol.map_drop:.2f})")
    return {"precision": precision, "raw_max_rel_diff": raw,
            **({} if raw_q is raw else {f"raw_{stat}_rel_diff": raw_q}), "matched": round(m_ref, 4),
            "matched_converse": round(m_out, 4), "reference_detections": n_ref, "map50": out.map50,
            "map50_drop": None if drop is None else round(drop, 5), "tolerance": asdict(tol),
            "passed": not fails, "reason": "; ".join(fails) or None}


def settings_for(ds, manifest, max_images: int | None = 16) -> GateSettings:
    """Gate settings for a validation DetectionDataset (boxed images only, at most `max_images`)."""
    if list(ds.classes) != list(manifest.classes):
        raise BadInput(f"{ds.root}: validation classes {list(ds.classes)} differ from the model's "
                       f"{list(manifest.classes)}; pass --val with data of the model's taxonomy")
    images = [im for im in ds.images if getattr(im, "boxed", True)][: max_images or None]
    return GateSettings(images=images, classes=list(manifest.classes), factor=scale_factor(ds.um_per_px, manifest),
                        operating_score=manifest.postprocess.score_threshold)


ENGINE_FOR_KIND = {"onnx": "onnxruntime", "openvino-xml": "openvino"}
ENGINE_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8-qdq": "int8"}


def conv_precisions(eng) -> dict:
    """OpenVINO's runtime model: how many convolutions execute in each precision, and the int8 share."""
    conv = eng.runtime_precisions().get("Convolution", {})
    n = sum(conv.values())
    low = sum(v for k, v in conv.items() if k in ("i8", "u8"))
    return {"convolutions": conv, "int8_fraction": round(low / n, 4) if n else None}


def gate_files(bundle, ref: RunResult, s: GateSettings, *, accept_drop: float | None = None, threads: int | None = None,
               progress=None) -> dict[str, dict]:
    """Run every detector model file of an opened Bundle through its runtime engine and judge it."""
    from cyto_edge.runtime.engines import load_engine

    names = bundle.manifest.output.all_names()
    out: dict[str, dict] = {}
    for f in bundle.manifest.files:
        if f.role != "detector" or f.kind not in ENGINE_FOR_KIND:
            continue
        backend = ENGINE_FOR_KIND[f.kind]
        with load_engine(bundle, backend, precision=ENGINE_PRECISION[f.precision], threads=threads, file=f.path) as eng:
            res = run_images(eng.infer, bundle.manifest, bundle.priors(), s, progress)
            q = judge(f.precision, ref, res, names, s, accept_drop)
            q["engine"] = backend
            if backend == "openvino":
                q["inference_precision"] = eng.inference_precision
                if f.precision == "int8-qdq":
                    q["openvino_runtime"] = conv_precisions(eng)
        if backend == "onnxruntime" and f.precision == "int8-qdq":
            q["openvino_runtime"] = _openvino_check(bundle, f.path, threads)
        out[f.path] = q
    return out


def _openvino_check(bundle, path: str, threads: int | None) -> dict:
    """Convolution precisions of the QDQ ONNX file as OpenVINO compiles it (when OpenVINO is installed)."""
    from cyto_edge.errors import MissingExtra
    from cyto_edge.runtime.engines import load_engine

    try:
        with load_engine(bundle, "openvino", precision="int8", threads=threads, file=path) as eng:
            return conv_precisions(eng)
    except MissingExtra as e:
        return {"not_checked": str(e)}
