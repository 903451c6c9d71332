"""Frame -> model-scale tiles -> raw outputs -> frame detections: the one path for `eval` and the device.

    img (H, W, 3) uint8 RGB at the camera's (or dataset's) µm/px
      -> rescaled by src_um_per_px / model_um_per_px (physical scale matching)
      -> overlapping tiles of the model input size at native resolution (decode.tile_grid),
         padded bottom/right with the normalization mean (normalizes to 0, as training pads)
      -> normalized NCHW float32 batches -> infer(batch) -> (loc (T, P, 4), logits (T, P, C+1)[, mil (T, P, C+1)])
      -> [runtime/rescore.py: logits re-scored by the MIL output, when the model has one]
      -> decode.postprocess per tile -> decode.merge_tiles -> boxes in the input image's pixels

A model trained with the MIL detector (train/mil.py) returns a third output; its re-scoring weight is the
manifest's `output.mil.weight` (Bundle.rescore_weight()) and must be passed as `rescore_weight`, so that
the device and `eval` re-score identically. A third output without a weight is refused, never ignored.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from cyto_edge.runtime.decode import Detections, PostProcess, TileGrid, merge_tiles, postprocess, tile_grid
from cyto_edge.runtime.rescore import rescored_logits

InferFn = Callable[[np.ndarray], tuple[np.ndarray, ...]]  # (loc, logits) or (loc, logits, mil)


def normalize_batch(tiles: np.ndarray, mean, std, scale: float = 1 / 255.0) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB -> (T, 3, H, W) float32, x = (pixel * scale - mean) / std."""
    m = np.asarray(mean, np.float32) / scale
    inv = 1.0 / (np.asarray(std, np.float32) / scale)
    x = (tiles.astype(np.float32) - m) * inv
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def pad_value(mean) -> tuple[int, int, int]:
    return tuple(int(round(v * 255)) for v in mean)


def rescale(img: np.ndarray, factor: float) -> np.ndarray:
    if abs(factor - 1.0) < 1e-3:
        return img
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, None, fx=factor, fy=factor, interpolation=interp)


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


def detect_frame(infer: InferFn, img_rgb: np.ndarray, *, input_size: int, priors: np.ndarray, variances,
                 cfg: PostProcess, mean, std, scale: float = 1 / 255.0, overlap: int = 128,
                 factor: float = 1.0, batch_size: int = 8, edge_margin: float = 3.0,
                 rescore_weight: float | None = None) -> Detections:
    """Detections of a whole frame, in the frame's own pixels. `factor` = src µm/px / model µm/px."""
    img = rescale(img_rgb, factor)
    tiles, grid = cut_tiles(img, input_size, overlap, pad_value(mean))
    per_tile: list[Detections] = []
    for s in range(0, len(tiles), batch_size):
        loc, logits = _rescored(infer(normalize_batch(tiles[s:s + batch_size], mean, std, scale)), rescore_weight)
        for i in range(loc.shape[0]):
            per_tile.append(postprocess(loc[i], logits[i], priors, variances, (input_size, input_size), cfg))
    det = merge_tiles(per_tile, grid, cfg.nms_iou, edge_margin, cfg.max_detections)
    if abs(factor - 1.0) >= 1e-3:
        det = det.shifted(0, 0, 1.0 / factor)
    return det


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
