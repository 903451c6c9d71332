"""The one decoder: raw head outputs -> boxes, scores, classes; thresholds; class-aware NMS; tiles.

Used by the device pipeline, by `eval` of a bundle and by the training-side evaluation, so that the
accuracy measured in training is the accuracy on the device.

Tensor contract (per image):
    loc     float32 (P, 4)   SSD offsets (t_cx, t_cy, t_w, t_h) against the priors, scaled by 1/variances
    logits  float32 (P, C+1) class logits, column 0 = background
    priors  float32 (P, 4)   (cx, cy, w, h) normalized to the model input (runtime/priors.py)
Detections come out as xyxy boxes in pixels of the model input (or of the frame after `merge_tiles`),
with foreground class indices 0..C-1 (background removed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cyto_edge.runtime.boxes import batched_nms

BBOX_CLIP = math.log(1000.0 / 16)  # largest exp() argument, as torchvision's BoxCoder
PREFILTER_ABOVE = 512              # postprocess pre-filters the priors by their best class above this many


@dataclass
class Detections:
    boxes: np.ndarray   # (K, 4) float32 xyxy pixels
    scores: np.ndarray  # (K,) float32
    labels: np.ndarray  # (K,) int64, foreground class index 0..C-1
    probs: np.ndarray | None = None  # (K, C) float32 class probabilities of each box's prior, if kept

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls, num_classes: int | None = None) -> "Detections":
        probs = np.zeros((0, num_classes), np.float32) if num_classes else None
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), probs)

    def select(self, idx: np.ndarray) -> "Detections":
        return Detections(self.boxes[idx], self.scores[idx], self.labels[idx],
                          None if self.probs is None else self.probs[idx])

    def shifted(self, dx: float, dy: float, scale: float = 1.0) -> "Detections":
        """Boxes mapped by (b * scale + offset): tile -> frame coordinates."""
        b = self.boxes * scale
        b[:, 0::2] += dx
        b[:, 1::2] += dy
        return Detections(b.astype(np.float32), self.scores, self.labels, self.probs)

    @staticmethod
    def concat(parts: list["Detections"]) -> "Detections":
        if not parts:
            return Detections.empty()
        probs = None if any(p.probs is None for p in parts) else np.concatenate([p.probs for p in parts])
        return Detections(np.concatenate([p.boxes for p in parts]).astype(np.float32),
                          np.concatenate([p.scores for p in parts]).astype(np.float32),
                          np.concatenate([p.labels for p in parts]).astype(np.int64), probs)


@dataclass
class PostProcess:
    """Post-processing settings; defaults travel in the bundle manifest."""

    score_threshold: float = 0.05
    class_thresholds: list[float] | None = None  # per class, overrides score_threshold where given
    nms_iou: float = 0.45
    max_detections: int = 200
    pre_nms_topk: int = 1000
    keep_probs: bool = False

    def thresholds(self, num_classes: int) -> np.ndarray:
        """(C,) float32 threshold per class (read-only: the array is kept for the next call with the same
        settings, as the decoder asks for it once per tile)."""
        key = (num_classes, self.score_threshold, None if self.class_thresholds is None else tuple(self.class_thresholds))
        cached = self.__dict__.get("_thresholds")
        if cached is not None and cached[0] == key:
            return cached[1]
        thr = np.full(num_classes, self.score_threshold, np.float32)
        if self.class_thresholds is not None:
            if len(self.class_thresholds) != num_classes:
                raise ValueError(f"class_thresholds has {len(self.class_thresholds)} values for {num_classes} classes")
            thr = np.asarray(self.class_thresholds, np.float32)
        thr.flags.writeable = False
        self.__dict__["_thresholds"] = (key, thr)
        return thr


def decode_boxes(loc: np.ndarray, priors: np.ndarray, variances=(0.1, 0.1, 0.2, 0.2),
                 size: tuple[int, int] = (1, 1)) -> np.ndarray:
    """(…, 4) offsets + (…, 4) priors -> (…, 4) xyxy in pixels of an input of `size` = (H, W).

    cx = p_cx + t_cx v_0 p_w, w = p_w exp(min(t_w v_2, log(1000/16))) (and y, h alike), as torchvision's
    BoxCoder; computed on (…, 2) pairs, the same float32 operations in the same order as one coordinate at
    a time."""
    H, W = size
    d = loc * np.asarray(variances, np.float32)
    c = d[..., :2] * priors[..., 2:]
    c += priors[..., :2]                                              # (cx, cy)
    half = np.exp(np.minimum(d[..., 2:], BBOX_CLIP))
    half *= priors[..., 2:]                                           # (w, h)
    half /= 2
    out = np.concatenate([c - half, c + half], -1)
    out *= np.asarray([W, H, W, H], np.float32)
    return out.astype(np.float32, copy=False)


def encode_boxes(boxes_xyxy: np.ndarray, priors: np.ndarray, variances=(0.1, 0.1, 0.2, 0.2),
                 size: tuple[int, int] = (1, 1)) -> np.ndarray:
    """Inverse of decode_boxes (used by tests and by the numpy side of the training targets)."""
    v = np.asarray(variances, np.float32)
    H, W = size
    b = boxes_xyxy / np.asarray([W, H, W, H], np.float32)
    cx, cy = (b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    return np.stack([(cx - priors[..., 0]) / (priors[..., 2] * v[0]), (cy - priors[..., 1]) / (priors[..., 3] * v[1]),
                     np.log(w / priors[..., 2]) / v[2], np.log(h / priors[..., 3]) / v[3]], -1).astype(np.float32)


def clip_boxes(boxes: np.ndarray, height: float, width: float) -> np.ndarray:
    """(K, 4) xyxy clipped to [0, width] x [0, height], in place (np.clip's result, without its overhead)."""
    lim = np.asarray([width, height, width, height], boxes.dtype)
    np.maximum(boxes, 0, out=boxes)
    np.minimum(boxes, lim, out=boxes)
    return boxes


def softmax(logits: np.ndarray) -> np.ndarray:
    e = logits - logits.max(axis=-1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def postprocess(loc: np.ndarray, logits: np.ndarray, priors: np.ndarray, variances, input_size: tuple[int, int],
                cfg: PostProcess | None = None) -> Detections:
    """One image: (P, 4) offsets and (P, C+1) logits -> thresholded, class-aware-NMSed detections."""
    cfg = cfg or PostProcess()
    C = logits.shape[-1] - 1
    thr = cfg.thresholds(C)
    probs = softmax(logits.astype(np.float32, copy=False))[:, 1:]      # (P, C)
    if len(probs) > PREFILTER_ABOVE:
        # Cheap pre-filter: only priors whose best foreground probability passes the lowest threshold.
        cand = np.flatnonzero(probs.max(axis=1) >= thr.min())
        if cand.size == 0:
            return Detections.empty(C if cfg.keep_probs else None)
        pc = probs[cand]                                                # (P', C)
    else:                      # a few priors (decode_tiles has pre-filtered them): one test is cheaper
        cand, pc = None, probs
    pi, ci = np.nonzero(pc >= thr[None, :])
    scores = pc[pi, ci]
    if scores.size > cfg.pre_nms_topk:
        top = np.argpartition(-scores, cfg.pre_nms_topk - 1)[: cfg.pre_nms_topk]
        pi, ci, scores = pi[top], ci[top], scores[top]
    prior_idx = pi if cand is None else cand[pi]
    boxes = decode_boxes(loc[prior_idx], priors[prior_idx], variances, input_size)
    clip_boxes(boxes, *input_size)
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not ok.all():
        boxes, scores, ci, prior_idx = boxes[ok], scores[ok], ci[ok], prior_idx[ok]
    keep = batched_nms(boxes, scores, ci, cfg.nms_iou)[: cfg.max_detections]
    return Detections(boxes[keep], scores[keep].astype(np.float32, copy=False), ci[keep].astype(np.int64, copy=False),
                      probs[prior_idx[keep]] if cfg.keep_probs else None)


def postprocess_batch(loc: np.ndarray, logits: np.ndarray, priors: np.ndarray, variances,
                      input_size: tuple[int, int], cfg: PostProcess | None = None) -> list[Detections]:
    """(N, P, 4), (N, P, C+1) -> one Detections per image."""
    return [postprocess(loc[i], logits[i], priors, variances, input_size, cfg) for i in range(loc.shape[0])]


# --------------------------------------------------------------------------------------- tiling

@dataclass(frozen=True)
class Tile:
    x0: int
    y0: int
    w: int  # valid (unpadded) width inside the frame
    h: int


@dataclass
class TileGrid:
    frame_size: tuple[int, int]  # (H, W)
    tile: int
    overlap: int
    tiles: list[Tile] = field(default_factory=list)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / stride) + 1
    last = length - tile
    # spread the starts evenly so that every overlap is at least `tile - stride`
    return sorted({round(i * last / (n - 1)) for i in range(n)})


def tile_grid(frame_h: int, frame_w: int, tile: int, overlap: int) -> TileGrid:
    """Overlapping tiles of `tile` px covering the frame; the last row/column is flush with the border.

    Frames smaller than a tile give one tile that the caller pads (bottom/right) to the input size.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, {tile}), got {overlap}")
    stride = tile - overlap
    ys, xs = _starts(frame_h, tile, stride), _starts(frame_w, tile, stride)
    tiles = [Tile(x, y, min(tile, frame_w - x), min(tile, frame_h - y)) for y in ys for x in xs]
    return TileGrid((frame_h, frame_w), tile, overlap, tiles)


def merge_tiles(per_tile: list[Detections], grid: TileGrid, nms_iou: float = 0.45, edge_margin: float = 3.0,
                max_detections: int | None = None) -> Detections:
    """Tile detections -> frame detections.

    A box that touches an interior tile edge (within `edge_margin` px) is a cut object; since the overlap
    is at least the largest object, the neighbouring tile holds the whole object, so the cut box is
    dropped. The survivors are merged with class-aware NMS across tiles.
    """
    H, W = grid.frame_size
    parts = []
    for det, t in zip(per_tile, grid.tiles):
        if len(det) == 0:
            continue
        b = det.boxes
        cut = np.zeros(len(det), bool)
        if t.x0 > 0:
            cut |= b[:, 0] <= edge_margin
        if t.y0 > 0:
            cut |= b[:, 1] <= edge_margin
        if t.x0 + t.w < W:
            cut |= b[:, 2] >= t.w - edge_margin
        if t.y0 + t.h < H:
            cut |= b[:, 3] >= t.h - edge_margin
        keep = det.select(np.flatnonzero(~cut)).shifted(t.x0, t.y0)
        keep.boxes[:, 0::2] = np.clip(keep.boxes[:, 0::2], 0, W)
        keep.boxes[:, 1::2] = np.clip(keep.boxes[:, 1::2], 0, H)
        parts.append(keep)
    if not parts:
        return Detections.empty(per_tile[0].probs.shape[1] if per_tile and per_tile[0].probs is not None else None)
    allp = Detections.concat(parts)
    keep = batched_nms(allp.boxes, allp.scores, allp.labels, nms_iou)
    if max_detections is not None:
        keep = keep[:max_detections]
    return allp.select(keep)
