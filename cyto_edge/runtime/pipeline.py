"""Frame -> detections -> grade, with per-stage timing: the device's two paths over one engine.

    pipe = Pipeline(bundle, engine, policy=policy_from_manifest(bundle), camera_um_per_px=0.31)
    fov = pipe.grade(frame_bgr)        # grading path: full resolution, tiled at the model's scale
    pre = pipe.preview(frame_bgr)      # preview path: every frame, the whole frame in one model input

Grading path (`grade`): the frame (H, W, 3) uint8 BGR is rescaled by camera µm/px / model µm/px, cut into
overlapping tiles of the model input at native resolution (tile size and overlap from the manifest's
`postprocess.tile`; the overlap may be overridden by the device profile), normalized as the manifest says
(colour order, scale, mean, std), inferred in batches, decoded by the one decoder and merged across tiles:
`tiling.detect_frame`, the function `eval` uses too, here with a helper thread that tiles and decodes while
the engine runs (`overlap_tiles`; the detections are the serial path's). Detections come back in frame pixels. Then the quality
of the frame (focus, exposure, empty field), the rule-based FOV grade (grading.grade_fov), the squamous-cell
count for adequacy (nuclei.segment_nuclei, once per FOV), and the bundle's second stages when it has them:
the cell classifier re-classifies the detected cells, the learned grader grades the FOV beside the rule.

Preview path (`preview`): the frame downscaled for display (longest side <= preview_max_side) and, from
it, the whole field fitted into one model input (letterboxed with the normalization mean), one inference,
the same decoder; boxes in frame pixels. The model sees the field at a coarser scale than it was trained
for, so preview boxes are a live guide only; the grade always comes from the grading path.

Timings are milliseconds per stage (rescale, tile, preprocess, infer, decode, merge, quality, grade, count,
classify, grader, total); the squamous count runs on a helper thread beside detection, so `count` is the
time grading waited for it after detection. The preview may have its own engine (`preview_engine`; build_pipeline opens one
with one thread by default), so that it never waits for a batch of grading tiles; otherwise both paths
share the engine, engines other than ONNX Runtime under a lock.
"""
from __future__ import annotations

import hashlib
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.runtime.bundle import Bundle, BundleError
from cyto_edge.runtime.decode import Detections, PostProcess, Tile, clip_boxes
from cyto_edge.runtime.grading import FovGrade, GradingPolicy, grade_fov
from cyto_edge.runtime.nuclei import NucleiParams, segment_nuclei
from cyto_edge.runtime.quality import analyze
from cyto_edge.runtime.sources.base import to_bgr8
from cyto_edge.runtime.tiling import TileBatcher, TileWorker, _Clock, decode_tiles, detect_frame

SCALE_TOLERANCE = 0.10   # camera vs model µm/px beyond which the frames are rescaled with a warning
THREAD_SAFE_ENGINES = {"onnxruntime"}   # InferenceSession.run may be called from several threads


class ScaleWarning(UserWarning):
    """The camera's µm/px differs from the model's by more than 10%: frames are rescaled."""


@dataclass
class FovResult:
    detections: Detections            # frame px, xyxy
    grade: FovGrade                   # the rule-based grade
    learned_grade: dict | None        # the learned grader's {grade, probs, n_cells}, when the bundle has one
    cell_attention: np.ndarray | None  # (N,) the grader's cross-attention per cell (cell_boxes order)
    quality: dict                     # FrameQuality.to_dict(): focus, exposure, tissue, empty...
    squamous_count: int | None
    timings: dict[str, float]         # stage -> ms
    frame_shape: tuple[int, ...]
    fov_id: object = None
    bundle_sha: str = ""              # sha256 of the bundle's manifest.json
    cell_boxes: np.ndarray | None = None   # (N, 4) frame px: the grader's cells, raster order
    classified: dict | None = None    # the cell classifier: per-cell labels/probs and its grade
    warnings: list[str] = field(default_factory=list)

    def to_dict(self, classes: list[str], top: int = 10) -> dict:
        """A JSON-ready summary: grade, counts, suspicion, the `top` detections, timings."""
        order = np.argsort(-self.detections.scores, kind="stable")[:top]
        dets = [{"cls": classes[int(self.detections.labels[i])], "score": round(float(self.detections.scores[i]), 4),
                 "box": [round(float(v), 1) for v in self.detections.boxes[i]]} for i in order]
        g = self.grade
        out = {"fov_id": self.fov_id, "grade": g.grade, "suspicion": round(g.suspicion, 4),
               "class_counts": {k: v for k, v in g.class_counts.items() if v},
               "category_counts": {k: v for k, v in g.category_counts.items() if v}, "organisms": g.organisms,
               "n_detections": g.n_detections, "squamous_count": self.squamous_count,
               "top_suspicious": [{"cls": d.cls, "category": d.category, "score": round(d.score, 4),
                                   "box": [round(v, 1) for v in d.box]} for d in g.top],
               "top_detections": dets, "quality": self.quality, "learned_grade": self.learned_grade,
               "timings_ms": {k: round(v, 2) for k, v in self.timings.items()},
               "frame_shape": list(self.frame_shape), "bundle_sha": self.bundle_sha}
        if self.classified is not None:
            out["classifier"] = {k: v for k, v in self.classified.items() if k != "cells"}
        if self.cell_attention is not None:
            out["cell_attention_max"] = round(float(self.cell_attention.max()), 4) if len(self.cell_attention) else None
        return out


@dataclass
class PreviewResult:
    detections: Detections            # frame px, xyxy
    timings: dict[str, float]         # stage -> ms: downscale, preprocess, infer, decode, total
    scale: float                      # preview px per frame px
    image: np.ndarray | None = None   # (h, w, 3) uint8 BGR: the frame downscaled for display


def manifest_sha(bundle: Bundle) -> str:
    return hashlib.sha256((bundle.path / "manifest.json").read_bytes()).hexdigest()


def as_frame(frame, where: str = "frame") -> np.ndarray:
    """Any frame -> (H, W, 3) uint8 BGR; grey, BGRA, 16-bit and float frames are converted, anything
    else (None, empty, 2 or 5 channels, complex pixels) is refused with BadInput."""
    if isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3 \
            and frame.size and frame.flags.c_contiguous:
        return frame
    try:
        img, _ = to_bgr8(frame)
    except ValueError as e:
        raise BadInput(f"{where}: {e}; a frame must be HxW (grey), HxWx3 (BGR) or HxWx4 (BGRA), "
                       "uint8, uint16 or float in [0, 1]") from None
    return img


class Pipeline:
    def __init__(self, bundle: Bundle, engine, *, policy: GradingPolicy, camera_um_per_px: float | None,
                 overlap: int | None = None, batch_size: int = 8, preview_max_side: int = 960, stages: bool = True,
                 edge_margin: float | None = None, count: bool = True, stage_threads: int | None = None,
                 preview_engine=None, overlap_tiles: bool = True):
        m = bundle.manifest
        self.bundle, self.engine, self.policy, self.manifest = bundle, engine, policy, m
        self.classes, self.taxonomy = bundle.classes, m.taxonomy()
        policy.check_classes(self.taxonomy, "grading policy")
        self.size = self._input_size(bundle)
        self.channels = (2, 1, 0) if m.input.color == "RGB" else (0, 1, 2)   # from the BGR frame
        self.priors, self.variances = bundle.priors(), m.output.variances
        self.cfg: PostProcess = bundle.postprocess()
        self.rescore_weight = bundle.rescore_weight()
        tile = m.postprocess.tile
        self.overlap = int(tile.overlap if overlap is None else overlap)
        if not 0 <= self.overlap < self.size:
            raise BadInput(f"tile overlap {self.overlap} px must be in [0, {self.size}) (the model input size)")
        self.edge_margin = float(tile.edge_margin if edge_margin is None else edge_margin)
        self.batch_size, self.preview_max_side, self.count = max(int(batch_size), 1), int(preview_max_side), count
        self.warnings: list[str] = []
        self.camera_um_per_px = float(camera_um_per_px) if camera_um_per_px else None
        self.factor = self._scale_factor()
        self.bundle_sha = manifest_sha(bundle)
        self._lock = None if getattr(engine, "name", "") in THREAD_SAFE_ENGINES else threading.Lock()
        self.preview_engine = preview_engine      # its own engine: the preview never waits for a grading batch
        self._local = threading.local()   # tile buffers per thread: preview and grading may run at once
        self.overlap_tiles = overlap_tiles   # tiling and decoding on a helper thread while the engine runs
        self._workers: list[TileWorker] = []
        self._counter: ThreadPoolExecutor | None = None   # the squamous count, beside detection
        self._pool_lock = threading.Lock()
        self.classifier = self.grader = None
        if stages and m.stages:
            from cyto_edge.runtime.second_stage import load_stages

            self.classifier, self.grader = load_stages(bundle, stage_threads)

    # -- set-up ---------------------------------------------------------------------------------------
    @staticmethod
    def _input_size(bundle: Bundle) -> int:
        m = bundle.manifest
        H, W = m.input.size
        if H != W:
            raise BundleError(f"{bundle.path}: input.size {H}x{W}: this runtime tiles square model inputs only")
        if m.input.resize != "tile":
            raise BundleError(f"{bundle.path}: input.resize {m.input.resize!r}: the pipeline grades 'tile' bundles "
                              "(native scale, overlapping tiles); re-export with tiling")
        ts = m.postprocess.tile.size
        if ts is not None and ts != H:
            raise BundleError(f"{bundle.path}: postprocess.tile.size {ts} differs from the model input {H}")
        return int(H)

    def _scale_factor(self) -> float:
        """Model px per frame px (camera µm/px over model µm/px); warns beyond 10%."""
        model = self.manifest.um_per_px
        if self.camera_um_per_px is None:
            self.warnings.append(f"camera µm/px unknown: frames are taken at the model's scale ({model:g} µm/px)")
            return 1.0
        f = self.camera_um_per_px / model
        if abs(f - 1.0) > SCALE_TOLERANCE:
            msg = (f"camera {self.camera_um_per_px:g} µm/px vs the model's {model:g} µm/px: frames are rescaled "
                   f"by {f:.3g}")
            self.warnings.append(msg)
            warnings.warn(msg, ScaleWarning, stacklevel=3)
        return f

    @property
    def um_per_px(self) -> float:
        """The frames' scale (µm per frame px)."""
        return self.camera_um_per_px or self.manifest.um_per_px

    def _batcher(self, n: int) -> TileBatcher:
        key = f"batcher{n}"
        b = getattr(self._local, key, None)
        if b is None:
            i = self.manifest.input
            b = TileBatcher(self.size, n, i.mean, i.std, i.scale, self.channels)
            setattr(self._local, key, b)
        return b

    def _worker(self) -> TileWorker | None:
        if not self.overlap_tiles:
            return None
        w = getattr(self._local, "worker", None)
        if w is None:
            i = self.manifest.input
            w = self._local.worker = TileWorker(self.size, self.batch_size, i.mean, i.std, i.scale, self.channels)
            self._workers.append(w)
        return w

    def _count_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._counter is None:
                self._counter = ThreadPoolExecutor(1, thread_name_prefix="cyto-count")
            return self._counter

    def close(self) -> None:
        """Release the engines (the grading one and the preview's own, if any) and the helper threads."""
        for w in self._workers:
            w.close()
        if self._counter is not None:
            self._counter.shutdown(wait=True)
            self._counter = None
        for e in (self.engine, self.preview_engine):
            if e is not None and hasattr(e, "close"):
                e.close()

    def warm_up(self) -> float:
        """One grading batch of blank tiles through the engine, so that the first FOV does not pay for the
        engine's first run at that shape (memory, kernels: 0.2 s on a 2-core CPU with OpenVINO). Seconds."""
        t0 = time.perf_counter()
        self.infer(np.zeros((self.batch_size, 3, self.size, self.size), np.float32))
        return time.perf_counter() - t0

    def infer(self, x: np.ndarray):
        if self._lock is None:
            return self.engine.infer(x)
        with self._lock:
            return self.engine.infer(x)

    # -- the grading path -------------------------------------------------------------------------------
    def detect(self, frame_bgr: np.ndarray, *, cfg: PostProcess | None = None, timings: dict | None = None,
               factor: float | None = None) -> Detections:
        """Detections of a full-resolution frame in frame px (`tiling.detect_frame`, as `eval` runs it)."""
        img, worker = as_frame(frame_bgr), self._worker()
        return detect_frame(self.infer, img, input_size=self.size, priors=self.priors, variances=self.variances,
                            cfg=cfg or self.cfg, mean=self.manifest.input.mean, std=self.manifest.input.std,
                            scale=self.manifest.input.scale, overlap=self.overlap,
                            factor=self.factor if factor is None else factor, batch_size=self.batch_size,
                            edge_margin=self.edge_margin, rescore_weight=self.rescore_weight,
                            channels=self.channels, timings=timings, worker=worker,
                            batcher=None if worker is not None else self._batcher(self.batch_size))

    def grade(self, frame_bgr: np.ndarray, *, fov_id=None, quality: dict | None = None) -> FovResult:
        """Grade one field of view (see the module docstring). `quality`: the frame's quality if already
        measured (e.g. FovEvent.quality.to_dict()), else it is measured here."""
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        img = as_frame(frame_bgr)
        counting = self._count_pool().submit(self._nuclei, img) if self.count else None
        det = self.detect(img, timings=timings)     # the count runs beside it (OpenCV releases the GIL)
        clock = _Clock(timings)
        q = dict(quality) if quality is not None else analyze(img).quality.to_dict()
        clock("quality")
        nuclei, squamous = counting.result() if counting is not None else (None, None)
        clock("count")                               # the wait for the count, once detection is done
        g = grade_fov(det, self.taxonomy, self.policy, squamous_count=squamous, focus=q.get("focus"))
        clock("grade")
        res = FovResult(det, g, None, None, q, squamous, timings, tuple(img.shape), fov_id, self.bundle_sha,
                        warnings=list(self.warnings))
        if self.classifier is not None:
            res.classified = self._classify(img, det)
            clock("classify")
        if self.grader is not None:
            if nuclei is None and self.grader.source == "nuclei":
                nuclei = self._nuclei(img, force=True)[0]
            lg = self.grader.grade(img, det, nuclei, self.um_per_px)
            res.learned_grade, res.cell_attention, res.cell_boxes = lg.to_dict(), lg.cell_scores, lg.cell_boxes
            clock("grader")
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return res

    def _nuclei(self, img: np.ndarray, force: bool = False):
        """(segment_nuclei result or None, squamous count or None): one segmentation for the adequacy count
        and the learned grader's cells."""
        if not (self.count or force):
            return None, None
        p = NucleiParams()
        nu = segment_nuclei(img, self.um_per_px, p)
        lo, hi = p.squamous_area_um2
        return nu, int(np.count_nonzero(nu.squamous & (nu.areas_um2 >= lo) & (nu.areas_um2 <= hi)))

    def _classify(self, img: np.ndarray, det: Detections) -> dict:
        c = self.classifier.classify(img, det, self.factor)
        thr = {name: float(t) for name, t in zip(c.classes, self.classifier.thresholds) if name in self.classes}
        policy = self.policy.model_copy(update={"class_thresholds": thr, "score_threshold": 0.0})
        g = grade_fov(self.classifier.confirmed_detections(det, c), self.taxonomy, policy)
        return {**c.to_dict(), "grade": g.grade, "suspicion": round(g.suspicion, 4),
                "confirmed_counts": {k: v for k, v in g.class_counts.items() if v}}

    # -- the preview path -------------------------------------------------------------------------------
    def preview(self, frame_bgr: np.ndarray, detections: Detections | None = None) -> PreviewResult:
        """Every frame: downscaled for display, the whole field in one model input (module docstring).
        With `detections` (frame px, e.g. those of the still field being graded) the model is not run."""
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        clock = _Clock(timings)
        img = as_frame(frame_bgr)
        H, W = img.shape[:2]
        s = min(1.0, self.preview_max_side / max(H, W))
        small = img if s >= 1.0 else cv2.resize(img, (max(round(W * s), 1), max(round(H * s), 1)),
                                                interpolation=cv2.INTER_LINEAR)
        clock("downscale")
        if detections is not None:
            timings["total"] = (time.perf_counter() - t0) * 1e3
            return PreviewResult(detections, timings, small.shape[1] / W, small)
        batch, size = self.preview_input(img)
        clock("preprocess")
        outputs = self.preview_engine.infer(batch) if self.preview_engine is not None else self.infer(batch)
        clock("infer")
        det = self.preview_decode(outputs, size, W)
        clock("decode")
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return PreviewResult(det, timings, small.shape[1] / W, small)

    def preview_input(self, img: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """(H, W, 3) uint8 BGR -> ((1, 3, S, S) normalized batch, (w, h) of the field inside it): the whole
        frame fitted into the model input, aspect kept, padded bottom/right."""
        H, W = img.shape[:2]
        fit = self.size / max(H, W)                     # model px per frame px
        w, h = min(max(round(W * fit), 1), self.size), min(max(round(H * fit), 1), self.size)
        inp = img if (w, h) == (W, H) else cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)  # one resampling
        return self._batcher(1).fill(inp, [Tile(0, 0, w, h)]), (w, h)

    def preview_decode(self, outputs, size: tuple[int, int], frame_w: int) -> Detections:
        """Raw outputs of a preview input -> detections in frame px."""
        w, h = size
        det = decode_tiles(outputs, self.priors, self.variances, self.size, self.cfg, self.rescore_weight)[0]
        if len(det) == 0:
            return det
        clip_boxes(det.boxes, h, w)
        if frame_w == w:                                # a frame at the input size: model px are frame px
            return det
        return det.shifted(0, 0, frame_w / w)           # model px -> frame px (x and y alike: aspect kept)


# -- assembly: bundle + profile + options -> engine and pipeline (run, bench, eval, calibrate, serve) ---------
PRECISION_OF_FILE = {"fp32": "fp32", "fp16": "fp16", "int8-qdq": "int8", "int8": "int8"}


def default_precision(bundle: Bundle) -> str:
    """fp32 when the bundle has it, else the first detector precision it has."""
    have = [PRECISION_OF_FILE[f.precision] for f in bundle.manifest.files
            if f.role == "detector" and f.precision in PRECISION_OF_FILE]
    if not have:
        raise BundleError(f"{bundle.path}: no detector model file in the manifest")
    return "fp32" if "fp32" in have else have[0]


def open_engine(bundle: Bundle, backend: str | None = None, *, precision: str | None = None,
                threads: int | None = None, device: str | None = None, spin_wait: bool | None = None):
    from cyto_edge.runtime.engines import load_engine

    opts = {"precision": precision or default_precision(bundle), "threads": threads}
    if device:
        opts["device"] = device
    if spin_wait is not None:               # ONNX Runtime's option; the other engines ignore it
        opts["spin_wait"] = spin_wait
    return load_engine(bundle, backend or "onnxruntime", **opts)


def grading_overrides(profile) -> dict:
    """The grading settings a device profile sets (None / empty ones left to the bundle)."""
    if profile is None:
        return {}
    return {k: v for k, v in profile.grading.model_dump().items() if v not in (None, {}, [])}


def build_pipeline(bundle: Bundle, *, profile=None, engine=None, backend: str | None = None,
                   precision: str | None = None, threads: int | None = None,
                   camera_um_per_px: float | None = None, overlap: int | None = None,
                   batch_size: int | None = None, stages: bool = True, count: bool = True,
                   preview_engine: bool = True, spin_wait: bool | None = None) -> Pipeline:
    """A Pipeline from a bundle, an optional DeviceProfile (engine, camera scale, pipeline and grading
    sections) and explicit options, which win over the profile. The engine is opened unless given;
    `preview_engine` opens a second one (same backend and precision, one thread) for the preview path.
    `spin_wait` (ONNX Runtime): None leaves it to the profile (off in every device profile) or, without
    one, to ONNX Runtime (on)."""
    from cyto_edge.runtime.grading import policy_from_manifest

    src = f"profile {getattr(profile, 'name', '')} grading".strip()
    policy = policy_from_manifest(bundle, grading_overrides(profile), source=src)
    eng_p = profile.engine if profile is not None else None
    pip_p = profile.pipeline if profile is not None else None
    kw = {"precision": precision or (eng_p.precision if eng_p else None),
          "device": eng_p.device if eng_p is not None and not backend else None,
          "spin_wait": spin_wait if spin_wait is not None else
          (getattr(eng_p, "spin_wait", None) if eng_p is not None and not backend else None)}
    name = backend or (eng_p.backend if eng_p else None)
    preview = None
    if engine is None:                      # (a given engine is used for both paths)
        engine = open_engine(bundle, name, threads=threads or (eng_p.threads if eng_p else None), **kw)
        if preview_engine:
            preview = open_engine(bundle, engine.name, **{**kw, "precision": engine.precision}, threads=1)
    if camera_um_per_px is None and profile is not None:
        camera_um_per_px = profile.camera.um_per_px
    return Pipeline(bundle, engine, policy=policy, camera_um_per_px=camera_um_per_px,
                    overlap=overlap if overlap is not None else (pip_p.tile_overlap_px if pip_p else None),
                    batch_size=batch_size or (pip_p.batch_size if pip_p else 8),
                    preview_max_side=pip_p.preview_max_side if pip_p else 960,
                    edge_margin=pip_p.edge_margin if pip_p else None, stages=stages, count=count,
                    stage_threads=threads or (eng_p.threads if eng_p else None), preview_engine=preview)
