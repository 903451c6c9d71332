"""Frame -> model-scale tiles -> raw outputs -> frame detections: the one path for `eval` and the device.

    img (H, W, 3) uint8 at the camera's (or dataset's) µm/px, RGB (or BGR with channels=(2, 1, 0))
      -> rescaled by src_um_per_px / model_um_per_px (physical scale matching; `rescale`)
      -> overlapping tiles of the model input size at native resolution (decode.tile_grid),
         padded bottom/right with the normalization mean (normalizes to ~0, as training pads)
      -> normalized NCHW float32 batches, written straight from the frame into one reused buffer
      -> infer(batch) -> (loc (T, P, 4), logits (T, P, C+1)[, mil (T, P, C+1)])
      -> [runtime/rescore.py: logits re-scored by the MIL output, when the model has one]
      -> decode.postprocess per tile -> decode.merge_tiles -> boxes in the input image's pixels

A model trained with the MIL detector (train/mil.py) returns a third output; its re-scoring weight is the
manifest's `output.mil.weight` (Bundle.rescore_weight()) and must be passed as `rescore_weight`, so that
the device and `eval` re-score identically. A third output without a weight is refused, never ignored.

Speed (the decoder's results are unchanged): priors that cannot pass the lowest class threshold are
dropped before the softmax by two logit tests (`candidate_indices`); normalization works per channel on
contiguous planes. With a `TileWorker` (the device's grading path), a helper thread fills batch k+1 and
decodes batch k-1 while the engine runs batch k (two tile buffers, used in turn), so that the engine is
seldom idle; the detections are identical to the serial path's. `timings`, when given, accumulates
milliseconds per stage: rescale, tile, preprocess, infer, decode, merge (with a worker: the time the
caller waited for each, the rest being hidden behind the engine).
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import cv2
import numpy as np

from cyto_edge.runtime.decode import Detections, PostProcess, Tile, TileGrid, merge_tiles, postprocess, tile_grid
from cyto_edge.runtime.rescore import rescored_logits

InferFn = Callable[[np.ndarray], tuple[np.ndarray, ...]]  # (loc, logits) or (loc, logits, mil)
RGB = (0, 1, 2)   # model channel c reads image channel RGB[c]; (2, 1, 0) feeds a BGR image to an RGB model
LOGIT_MARGIN = 1e-3  # slack of the logit pre-filter against float rounding in the softmax


def _norm_consts(mean, std, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(3,) float32 gain a and offset b with x = pixel a + b == (pixel * scale - mean) / std."""
    a = np.float32(scale) / np.asarray(std, np.float32)
    b = -np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    return a.astype(np.float32), b.astype(np.float32)


def _normalize_plane(src: np.ndarray, dst: np.ndarray, gain: float, offset: float) -> None:
    """dst (h, w) float32 <- src (h, w) uint8 x gain + offset, one pass (OpenCV's addWeighted with a zero
    second weight; dst may be a view with a row stride, it is written in place). normalize_batch and
    TileBatcher both normalize through it, so their numbers are equal bit for bit."""
    cv2.addWeighted(src, float(gain), src, 0.0, float(offset), dst=dst, dtype=cv2.CV_32F)


def normalize_batch(tiles: np.ndarray, mean, std, scale: float = 1 / 255.0, channels=RGB) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float32, x = (pixel * scale - mean) / std; model channel c is
    image channel `channels[c]`."""
    a, b = _norm_consts(mean, std, scale)
    out = np.empty((tiles.shape[0], 3, *tiles.shape[1:3]), np.float32)
    for i in range(tiles.shape[0]):
        planes = cv2.split(np.ascontiguousarray(tiles[i]))
        for c in range(3):
            _normalize_plane(planes[channels[c]], out[i, c], a[c], b[c])
    return out


def pad_value(mean) -> tuple[int, int, int]:
    return tuple(int(round(v * 255)) for v in mean)


def rescale(img: np.ndarray, factor: float) -> np.ndarray:
    """(H, W, 3) -> (round(H f), round(W f), 3). Shrinking: k x k area means for the integer part k of 1/f
    (OpenCV's fast integer INTER_AREA), then bilinear for the rest (a factor in (0.5, 1]); OpenCV's general
    INTER_AREA gives nearly the same pixels (within one output pixel of alignment) 5-10x slower. Enlarging:
    bilinear."""
    if abs(factor - 1.0) < 1e-3:
        return img
    H, W = img.shape[:2]
    size = (max(int(round(W * factor)), 1), max(int(round(H * factor)), 1))
    k = int(1.0 / factor + 1e-9) if factor < 1 else 1
    if k >= 2:
        Hk, Wk = H // k * k, W // k * k
        img = cv2.resize(img[:Hk, :Wk], (Wk // k, Hk // k), interpolation=cv2.INTER_AREA)
    if (img.shape[1], img.shape[0]) == size:
        return img
    return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)


def cut_tiles(img: np.ndarray, tile: int, overlap: int, pad_rgb=(124, 116, 104)) -> tuple[np.ndarray, TileGrid]:
    """(H, W, 3) uint8 -> (T, tile, tile, 3) uint8 tiles and their grid."""
    H, W = img.shape[:2]
    grid = tile_grid(H, W, tile, overlap)
    out = np.empty((len(grid.tiles), tile, tile, 3), np.uint8)
    for i, t in enumerate(grid.tiles):
        if t.w < tile or t.h < tile:
            out[i] = pad_rgb
        out[i, :t.h, :t.w] = img[t.y0:t.y0 + t.h, t.x0:t.x0 + t.w]
    return out, grid


class TileBatcher:
    """Writes normalized tiles of a frame into one reused (batch, 3, S, S) float32 buffer.

    Identical numbers to cut_tiles + normalize_batch (padding = the normalized pad_value), without the
    intermediate uint8 copy of every tile: each tile's planes are normalized straight into the buffer.
    """

    def __init__(self, size: int, batch_size: int, mean, std, scale: float = 1 / 255.0, channels=RGB):
        self.size, self.batch_size, self.channels = int(size), max(int(batch_size), 1), tuple(channels)
        self.a, self.b = _norm_consts(mean, std, scale)
        pad = np.asarray([pad_value(mean)[c] for c in range(3)], np.uint8)    # model channel order
        self.pad = np.empty((1, 3), np.float32)                                # the normalized padding,
        for c in range(3):                                                     # as the pixels are
            _normalize_plane(pad[c:c + 1, None], self.pad[:, c:c + 1], self.a[c], self.b[c])
        self.pad = self.pad[0]
        self.buf = np.empty((self.batch_size, 3, self.size, self.size), np.float32)

    def fill(self, img: np.ndarray, tiles: list[Tile]) -> np.ndarray:
        """img (H, W, 3) uint8; tiles (n <= batch_size) -> (n, 3, S, S) view of the buffer."""
        S = self.size
        for i, t in enumerate(tiles):
            planes = cv2.split(img[t.y0:t.y0 + t.h, t.x0:t.x0 + t.w])   # 3 contiguous (h, w) uint8 planes
            for c in range(3):
                plane = self.buf[i, c]
                if t.h < S or t.w < S:
                    plane[...] = self.pad[c]
                _normalize_plane(planes[self.channels[c]], plane[:t.h, :t.w], self.a[c], self.b[c])
        return self.buf[:len(tiles)]


class TileWorker:
    """A helper thread and two TileBatchers for `detect_frame`'s overlapped path (one per calling thread:
    the buffers are reused from frame to frame). Engines release the GIL while they run, and so do OpenCV
    and numpy's array loops, so the helper works while the engine does."""

    def __init__(self, size: int, batch_size: int, mean, std, scale: float = 1 / 255.0, channels=RGB):
        self.batchers = [TileBatcher(size, batch_size, mean, std, scale, channels) for _ in range(2)]
        self.size, self.batch_size = self.batchers[0].size, self.batchers[0].batch_size
        self._pool: ThreadPoolExecutor | None = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cyto-tiles")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def candidate_indices(logits: np.ndarray, min_threshold: float) -> list[np.ndarray]:
    """(B, P, C+1) logits -> per tile, the sorted indices of the priors whose best foreground class could
    reach `min_threshold` (every prior when the threshold is not in (0, 1)).

    Two necessary conditions for p_c = softmax(l)_c >= t: p_c <= sigmoid(l_c - l_0), so l_c - l_0 >= logit(t)
    (a confident background); and sum_j exp(l_j) >= (C+1) exp(mean(l)) (Jensen), so l_c - mean(l) >=
    log(t (C+1)) (an undecided prior, all classes alike). The first is tested on every prior, the second
    only on those that pass the first; each tile's logits are transposed once (OpenCV, one pass) so that
    the reduction over classes runs over contiguous rows."""
    B, P, n = logits.shape
    if not 0.0 < min_threshold < 1.0:
        return [np.arange(P) for _ in range(B)]
    k_background = np.float32(math.log(min_threshold / (1.0 - min_threshold)) - LOGIT_MARGIN)
    k_mean = np.float32(math.log(min_threshold * n) - LOGIT_MARGIN)
    out = []
    for i in range(B):
        t = _classes_first(logits[i])                                   # (C+1, P) contiguous
        best = t[1:].max(0)                                             # (P,) best foreground logit
        best -= t[0]
        idx = np.flatnonzero(best >= k_background)
        if idx.size:
            sub = t[:, idx]
            idx = idx[sub[1:].max(0) - sub.sum(0) / np.float32(n) >= k_mean]
        out.append(idx)
    return out


def _classes_first(x: np.ndarray) -> np.ndarray:
    """(P, K) -> (K, P) C-contiguous."""
    if x.dtype == np.float32 and x.strides[-1] == 4 and x.strides[0] > 0:
        return cv2.transpose(x)
    return np.ascontiguousarray(x.T)


def decode_tiles(outputs, priors: np.ndarray, variances, input_size: int, cfg: PostProcess,
                 rescore_weight: float | None = None) -> list[Detections]:
    """One batch of raw outputs -> one Detections per tile (tile pixels), as decode.postprocess gives them."""
    loc, logits = _rescored(outputs, rescore_weight)
    C = logits.shape[-1] - 1
    out = []
    for i, idx in enumerate(candidate_indices(logits, float(cfg.thresholds(C).min()))):
        if idx.size == 0:                       # nothing can pass: what postprocess returns, without its work
            out.append(Detections.empty(C if cfg.keep_probs else None))
            continue
        out.append(postprocess(loc[i, idx], logits[i, idx], priors[idx], variances, (input_size, input_size), cfg))
    return out


class _Clock:
    """Adds the milliseconds since the last call to timings[stage] (a no-op without a dict)."""

    def __init__(self, timings: dict | None):
        self.timings, self.t = timings, time.perf_counter()

    def __call__(self, stage: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[stage] = self.timings.get(stage, 0.0) + (now - self.t) * 1e3
            self.t = now


def detect_frame(infer: InferFn, img_rgb: np.ndarray, *, input_size: int, priors: np.ndarray, variances,
                 cfg: PostProcess, mean, std, scale: float = 1 / 255.0, overlap: int = 128,
                 factor: float = 1.0, batch_size: int = 8, edge_margin: float = 3.0,
                 rescore_weight: float | None = None, channels=RGB, timings: dict | None = None,
                 batcher: TileBatcher | None = None, worker: TileWorker | None = None) -> Detections:
    """Detections of a whole frame, in the frame's own pixels. `factor` = src µm/px / model µm/px.

    channels: the image channel feeding each model channel ((2, 1, 0): a BGR frame for an RGB model).
    batcher: a TileBatcher to reuse (same size, mean, std, scale and channels); worker: a TileWorker (same
    settings) to overlap tiling and decoding with inference, whose buffers then replace `batcher`; timings:
    see the module docstring.
    """
    clock = _Clock(timings)
    img = rescale(img_rgb, factor)
    clock("rescale")
    grid = tile_grid(img.shape[0], img.shape[1], input_size, overlap)
    starts = range(0, len(grid.tiles), batch_size)
    if worker is not None and len(starts) > 1 and worker.size == input_size and worker.batch_size >= batch_size:
        clock("tile")
        per_tile = _overlapped(infer, img, grid, starts, batch_size, worker, clock,
                               lambda out: decode_tiles(out, priors, variances, input_size, cfg, rescore_weight))
        return _merged(per_tile, grid, cfg, edge_margin, factor, clock)
    if worker is not None:                      # one batch: the worker's first buffer serves the serial path
        batcher = worker.batchers[0]
    if batcher is None or batcher.size != input_size or batcher.batch_size < batch_size:
        batcher = TileBatcher(input_size, batch_size, mean, std, scale, channels)
    clock("tile")
    per_tile: list[Detections] = []
    for s in starts:
        batch = batcher.fill(img, grid.tiles[s:s + batch_size])
        clock("preprocess")
        outputs = infer(batch)
        clock("infer")
        per_tile += decode_tiles(outputs, priors, variances, input_size, cfg, rescore_weight)
        clock("decode")
    return _merged(per_tile, grid, cfg, edge_margin, factor, clock)


def _merged(per_tile: list[Detections], grid: TileGrid, cfg: PostProcess, edge_margin: float, factor: float,
            clock: _Clock) -> Detections:
    det = merge_tiles(per_tile, grid, cfg.nms_iou, edge_margin, cfg.max_detections)
    if abs(factor - 1.0) >= 1e-3:
        det = det.shifted(0, 0, 1.0 / factor)
    clock("merge")
    return det


def _overlapped(infer: InferFn, img: np.ndarray, grid: TileGrid, starts: range, batch_size: int,
                worker: TileWorker, clock: _Clock, decode: Callable) -> list[Detections]:
    """The batches of one frame with the helper thread one step ahead (fill k+1) and one behind (decode
    k-1) of the engine (batch k). Batch k+2 is only filled once infer(k) has returned, so the engine never
    reads a buffer being written. Errors of either thread are raised here."""
    def fill(k: int) -> np.ndarray:
        return worker.batchers[k % 2].fill(img, grid.tiles[starts[k]:starts[k] + batch_size])

    pool = worker.pool
    pending = pool.submit(fill, 0)
    decoded = []
    try:
        for k in range(len(starts)):
            batch = pending.result()
            clock("preprocess")
            if k + 1 < len(starts):
                pending = pool.submit(fill, k + 1)
            outputs = infer(batch)
            clock("infer")
            decoded.append(pool.submit(decode, outputs))
        per_tile = [d for f in decoded for d in f.result()]
        clock("decode")
    finally:                                  # on an error, let the helper finish before the buffers are reused
        pending.cancel() or pending.exception()
        for f in decoded:
            f.cancel() or f.exception()
    return per_tile


def _rescored(outputs, weight: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(loc, logits) as they are, or (loc, logits re-scored by the MIL output) for a three-output model."""
    if len(outputs) == 2:
        return outputs[0], outputs[1]
    if len(outputs) != 3:
        raise ValueError(f"a detector returns (loc, logits) or (loc, logits, mil), got {len(outputs)} outputs")
    if weight is None:
        raise ValueError("the model returns a MIL re-scoring output: pass rescore_weight "
                         "(the manifest's output.mil.weight, Bundle.rescore_weight())")
    loc, logits, mil = outputs
    return loc, rescored_logits(logits, mil, weight)
