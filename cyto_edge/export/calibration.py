"""What the device sees, for calibration and for the export gate: model-input tiles of real images.

Calibration data are tiles of the *train* split (never validation or test), cut exactly as the device
cuts frames (runtime/tiling.py): each image rescaled by dataset µm/px / model µm/px, cut into
overlapping tiles of the model input size, padded with the normalization mean, normalized as the
manifest says. `calibration_tiles` draws N of them, spread over the images with a seed.

    tiles = calibration_tiles(load_detection(root, "train"), manifest, n=64)   # (64, 3, H, W) float32
    reader = TileReader(tiles, "images", batch=8)                              # for quantize_static
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.runtime.bundle import Manifest
from cyto_edge.runtime.tiling import cut_tiles, normalize_batch, pad_value, rescale

try:  # the export extra installs onnxruntime; the reader is only needed by quantize.py
    from onnxruntime.quantization import CalibrationDataReader
except ImportError:  # pragma: no cover
    CalibrationDataReader = object  # type: ignore[misc,assignment]


def scale_factor(ds_um_per_px: float | None, manifest: Manifest) -> float:
    """Frame rescale factor: dataset µm/px over the model's (1.0 when the dataset does not say)."""
    return float(ds_um_per_px) / manifest.um_per_px if ds_um_per_px else 1.0


def image_tiles(img_rgb: np.ndarray, manifest: Manifest, factor: float) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (T, 3, S, S) float32 normalized tiles, as runtime/tiling.detect_frame cuts them."""
    inp = manifest.input
    S = inp.size[0]
    overlap = manifest.postprocess.tile.overlap
    tiles, _ = cut_tiles(rescale(img_rgb, factor), S, overlap, pad_value(inp.mean))
    return normalize_batch(tiles, inp.mean, inp.std, inp.scale)


def read_rgb(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise BadInput(f"{path}: cannot read image (missing or corrupt); run `cyto-edge data check` on the dataset")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def calibration_tiles(ds, manifest: Manifest, n: int, seed: int = 0, max_images: int | None = None) -> np.ndarray:
    """(n, 3, S, S) float32: `n` model-input tiles drawn from the images of `ds` (a DetectionDataset).

    Images are visited in a seeded order; each contributes at most ceil(n / images) tiles (chosen at
    random among its tiles) so that the set spans many fields rather than one.
    """
    if n <= 0:
        raise BadInput(f"--calib-images must be > 0, got {n}")
    if len(ds.images) == 0:
        raise BadInput(f"{ds.root}: no images to calibrate on")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ds.images))[: max_images or len(ds.images)]
    per_image = max(1, -(-n // len(order)))
    factor = scale_factor(ds.um_per_px, manifest)
    picked: list[np.ndarray] = []
    total = 0
    for i in order:
        t = image_tiles(read_rgb(ds.images[i].file), manifest, factor)
        keep = t[rng.permutation(len(t))[:per_image]]
        picked.append(keep)
        total += len(keep)
        if total >= n:
            break
    out = np.concatenate(picked)[:n]
    return np.ascontiguousarray(out, dtype=np.float32)


class TileReader(CalibrationDataReader):
    """onnxruntime.quantization CalibrationDataReader over pre-cut tiles, `batch` tiles per call."""

    def __init__(self, tiles: np.ndarray, input_name: str = "images", batch: int = 8):
        self.tiles, self.input_name, self.batch = tiles, input_name, max(1, int(batch))
        self.pos = 0

    def get_next(self) -> dict | None:
        if self.pos >= len(self.tiles):
            return None
        x = self.tiles[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return {self.input_name: x}

    def rewind(self) -> None:
        self.pos = 0

    def __len__(self) -> int:
        return -(-len(self.tiles) // self.batch)
