"""Second-stage models of a bundle on the device: the cell classifier and the learned FOV grader (ONNX Runtime).

The bundle's manifest lists them under `stages` (written by cyto_edge.export.second_stage.add_to_bundle,
whose docstring is the I/O contract); the files are verified with the bundle's other files.

- CellClassifier: re-classifies the detector's cells. Crops are cut around each detection (the stage's
  crop geometry: the square centred on the box, side max(w, h) x (1 + 2 context), or `fixed_side` px at
  the bundle's scale; border pixels repeated; resized to S x S), batched, and classified; a cell is
  *confirmed* when the probability of its best class reaches that class's threshold (the stage's
  `thresholds`, default 0.5). The classifier's "normal" class confirms a cell as NILM. Its grade comes from
  the confirmed cells through the same rule as the detector's (grading.grade_fov).
- FovGrader: the learned FOV grade from the FOV's cells (stage["cells"]["source"]: "nuclei", the
  `max_cells` largest nuclei of runtime.nuclei.segment_nuclei, a window of `window_um` µm; or "gt", the
  detections with the crop's context), read in raster order; returns the grade probabilities and each
  cell's cross-attention score, which is kept beside the cell's box.

Crop geometry and raster order mirror cyto_edge.train.cellcrops (cut_crop, raster_order), which the
runtime may not import; a test checks that both give the same pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cyto_edge.errors import BadInput, MissingExtra
from cyto_edge.runtime.bundle import Bundle, BundleError
from cyto_edge.runtime.decode import Detections
from cyto_edge.runtime.tiling import normalize_batch

BACKGROUND = "normal"       # the classifier's background class (NILM)
DEFAULT_THRESHOLD = 0.5
MAX_CLASSIFIED = 64         # cells classified per FOV (the most confident detections)
CHUNK = 32                  # crops per classifier call


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def cut_crop(img: np.ndarray, box, size: int, context: float = 0.25, fixed_side: float | None = None) -> np.ndarray:
    """img (H, W, 3) uint8; box (4,) xyxy px -> (size, size, 3) uint8 (cellcrops.cut_crop's geometry)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    side = fixed_side if fixed_side else max(x2 - x1, y2 - y1, 1.0) * (1 + 2 * context)
    s = max(int(round(side)), 2)
    left, top = int(round(cx - s / 2)), int(round(cy - s / 2))
    H, W = img.shape[:2]
    pad = [max(0, -top), max(0, top + s - H), max(0, -left), max(0, left + s - W)]
    if any(pad):
        img = cv2.copyMakeBorder(img, *pad, cv2.BORDER_REPLICATE)
        top, left = top + pad[0], left + pad[2]
    return resize_square(img[top:top + s, left:left + s], size)


def raster_order(boxes: np.ndarray, row_px: float = 32.0) -> np.ndarray:
    """Index order of boxes (K, 4) xyxy px by their centres: rows of `row_px`, then left to right."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    return np.lexsort((cx, np.floor(cy / row_px))).astype(np.int64)


class _Stage:
    """One ONNX second stage: the session, its input spec and the crop preprocessing."""

    role = ""

    def __init__(self, bundle: Bundle, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - the runtime extra installs it
            raise MissingExtra("onnxruntime", "runtime", "second-stage models run in ONNX Runtime") from e
        self.stage = dict(bundle.manifest.stages[self.role])
        where = f"{bundle.path}: stages.{self.role}"
        inp = self.stage.get("input") or {}
        try:
            self.size = int(inp["size"][0])
            self.mean, self.std = inp["mean"], inp["std"]
            self.scale = float(inp.get("scale", 1 / 255))
        except (KeyError, TypeError, IndexError, ValueError):
            raise BundleError(f"{where}.input: needs size, mean and std (re-export the stage)") from None
        self.channels = (2, 1, 0) if str(inp.get("color", "RGB")).upper() == "RGB" else (0, 1, 2)  # from BGR
        self.classes = list(self.stage.get("classes") or [])
        if not self.classes:
            raise BundleError(f"{where}.classes: missing")
        path = bundle.model_file("onnx", role=self.role)
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads, so.inter_op_num_threads = int(threads), 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        shape = self.session.get_inputs()[0].shape
        if len(shape) != 4 or shape[2:] != [self.size, self.size]:
            raise BundleError(f"{path}: input shape {shape} does not match {where}.input.size {self.size}")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def prepare(self, crops_bgr: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 BGR -> (N, 3, S, S) float32 normalized as the stage was trained."""
        return normalize_batch(crops_bgr, self.mean, self.std, self.scale, self.channels)

    def crops(self, frame_bgr: np.ndarray, boxes: np.ndarray, context: float, side: float | None) -> np.ndarray:
        out = np.empty((len(boxes), self.size, self.size, 3), np.uint8)
        for i, b in enumerate(boxes):
            out[i] = cut_crop(frame_bgr, b, self.size, context, side)
        return out


@dataclass
class Classified:
    """The classifier's verdict on the first `n` detections (by score)."""

    index: np.ndarray       # (n,) int64 indices into the FOV's detections
    classes: list[str]      # the classifier's classes
    labels: np.ndarray      # (n,) int64 best class
    probs: np.ndarray       # (n, K) float32
    confirmed: np.ndarray   # (n,) bool: the best class reaches its threshold

    def to_dict(self) -> dict:
        return {"classes": self.classes, "index": self.index.tolist(),
                "label": [self.classes[k] for k in self.labels],
                "prob": [round(float(p), 4) for p in self.probs[np.arange(len(self.labels)), self.labels]],
                "confirmed": self.confirmed.tolist()}


class CellClassifier(_Stage):
    role = "classifier"

    def __init__(self, bundle: Bundle, threads: int | None = None):
        super().__init__(bundle, threads)
        crop = self.stage.get("crop") or {}
        self.context = float(crop.get("context", 0.25))
        self.fixed_side = crop.get("fixed_side")            # px at the bundle's scale
        thr = self.stage.get("thresholds") or {}
        self.thresholds = np.asarray([float(thr.get(c, DEFAULT_THRESHOLD)) for c in self.classes], np.float32)
        unknown = [c for c in self.classes if c != BACKGROUND and c not in bundle.classes]
        if unknown:
            raise BundleError(f"{bundle.path}: stages.classifier classes {unknown} are not classes of the bundle")
        self._to_bundle = np.asarray([bundle.classes.index(c) if c in bundle.classes else -1 for c in self.classes])

    def classify(self, frame_bgr: np.ndarray, det: Detections, factor: float = 1.0,
                 max_cells: int = MAX_CLASSIFIED) -> Classified:
        """Crops of the `max_cells` best detections (frame px; `factor` = model px per frame px)."""
        index = np.argsort(-det.scores, kind="stable")[:max_cells].astype(np.int64)
        side = float(self.fixed_side) / factor if self.fixed_side else None
        probs = np.zeros((len(index), len(self.classes)), np.float32)
        for s in range(0, len(index), CHUNK):
            crops = self.crops(frame_bgr, det.boxes[index[s:s + CHUNK]], self.context, side)
            probs[s:s + CHUNK] = self.session.run(None, {self.input_name: self.prepare(crops)})[0]
        labels = probs.argmax(1) if len(index) else np.zeros(0, np.int64)
        best = probs[np.arange(len(index)), labels]
        return Classified(index, self.classes, labels.astype(np.int64), probs, best >= self.thresholds[labels])

    def confirmed_detections(self, det: Detections, c: Classified) -> Detections:
        """The confirmed, non-background cells relabelled with the bundle's class index and scored by the
        classifier (input to grading.grade_fov)."""
        lab = self._to_bundle[c.labels] if len(c.labels) else np.zeros(0, np.int64)
        keep = c.confirmed & (lab >= 0)
        idx = c.index[keep]
        return Detections(det.boxes[idx], c.probs[keep, c.labels[keep]].astype(np.float32), lab[keep].astype(np.int64))


@dataclass
class LearnedGrade:
    grade: str                 # the most probable Bethesda category
    probs: dict[str, float]    # category -> probability
    cell_boxes: np.ndarray     # (N, 4) float32 xyxy frame px, raster order
    cell_scores: np.ndarray    # (N,) float32 cross-attention of each cell (sums to 1 for N >= 1)
    cell_probs: np.ndarray | None  # (N, C) per-cell in-the-class probabilities, when the model has them

    def to_dict(self) -> dict:
        return {"grade": self.grade, "probs": {k: round(v, 4) for k, v in self.probs.items()},
                "n_cells": int(len(self.cell_scores))}


class FovGrader(_Stage):
    role = "grader"

    def __init__(self, bundle: Bundle, threads: int | None = None):
        super().__init__(bundle, threads)
        cells = self.stage.get("cells") or {}
        self.source = cells.get("source", "nuclei")
        if self.source not in ("nuclei", "gt"):
            raise BundleError(f"{bundle.path}: stages.grader.cells.source {self.source!r} must be nuclei or gt")
        self.max_cells = int(cells.get("max_cells", 48))
        self.row_px = float(cells.get("row_px", 32.0))
        self.window_um = cells.get("window_um")
        self.train_um = cells.get("um_per_px")            # scale of the training images (row_px is in their px)
        crop = self.stage.get("crop") or {}
        self.context = float(crop.get("context", 0.25))
        if self.source == "nuclei" and not self.window_um:
            raise BundleError(f"{bundle.path}: stages.grader.cells.window_um is needed for nuclei cells")

    def cell_boxes(self, det: Detections, nuclei, um_per_px: float) -> np.ndarray:
        """(N, 4) xyxy frame px of the cells the grader reads (before raster ordering)."""
        if self.source == "gt":
            order = np.argsort(-det.scores, kind="stable")[: self.max_cells]
            return det.boxes[order].astype(np.float32)
        keep = np.argsort(-nuclei.areas_um2, kind="stable")[: self.max_cells]
        c = nuclei.centres[keep]                                   # (K, 2) xy frame px
        half = float(self.window_um) / um_per_px / 2
        return np.concatenate([c - half, c + half], 1).astype(np.float32).reshape(-1, 4)

    def grade(self, frame_bgr: np.ndarray, det: Detections, nuclei, um_per_px: float) -> LearnedGrade:
        boxes = self.cell_boxes(det, nuclei, um_per_px)
        row = self.row_px * (float(self.train_um) / um_per_px if self.train_um else 1.0)
        boxes = boxes[raster_order(boxes, row)]
        side = float(self.window_um) / um_per_px if self.source == "nuclei" else None
        x = self.prepare(self.crops(frame_bgr, boxes, 0.0 if side else self.context, side))
        outs = dict(zip(self.output_names, self.session.run(None, {self.input_name: x})))
        probs = np.asarray(outs["fov_probs"], np.float32).reshape(-1)
        if probs.shape[0] != len(self.classes):
            raise BundleError(f"grader: fov_probs has {probs.shape[0]} values for {len(self.classes)} classes")
        cp = outs.get("cell_probs")
        return LearnedGrade(self.classes[int(probs.argmax())], {c: float(p) for c, p in zip(self.classes, probs)},
                            boxes, np.asarray(outs["cell_scores"], np.float32).reshape(-1),
                            None if cp is None else np.asarray(cp, np.float32))


def load_stages(bundle: Bundle, threads: int | None = None) -> tuple[CellClassifier | None, FovGrader | None]:
    """The bundle's second stages (None for each one it does not have)."""
    stages = bundle.manifest.stages or {}
    unknown = set(stages) - {"classifier", "grader"}
    if unknown:
        raise BadInput(f"{bundle.path}: unknown stages {sorted(unknown)} in the manifest (known: classifier, grader)")
    clf = CellClassifier(bundle, threads) if "classifier" in stages else None
    grader = FovGrader(bundle, threads) if "grader" in stages else None
    return clf, grader
