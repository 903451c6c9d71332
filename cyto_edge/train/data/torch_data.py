"""Training crops for the detector (PyTorch side).

Training takes crops of the model's input size from full-resolution images at the model's physical
scale (µm/px); it never resizes a whole field into the model input. An image at a different scale is
rescaled by data_um_per_px / model_um_per_px first (physical scale matching, as the runtime does).

Each sample is drawn from its own RNG seeded by (seed, epoch, index), so a run is deterministic per seed
whatever the number of loader workers.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from cyto_edge.runtime.tiling import normalize_batch
from cyto_edge.train.data.types import DetectionDataset, ImageRecord

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PAD_RGB = tuple(int(round(m * 255)) for m in MEAN)  # padding that normalizes to 0


@dataclass
class AugConfig:
    flip: bool = True
    rot90: bool = True
    hue: float = 6.0            # degrees
    saturation: float = 0.2     # x [1-s, 1+s]
    value: float = 0.15
    gamma: float = 0.15         # per-channel gamma jitter (stain variation)
    blur_p: float = 0.2
    noise_p: float = 0.2
    scale: tuple[float, float] = (0.9, 1.1)
    pos_fraction: float = 0.6   # crops centred on a labelled object
    min_visible: float = 0.5    # a cut object with less visible area is ignored, not background


class ImageCache:
    """Decoded RGB images at the model's scale, LRU-bounded by megabytes (one per loader process)."""

    def __init__(self, max_mb: float = 1500):
        self.max_bytes = max_mb * 1e6
        self._d: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, path: str, factor: float) -> np.ndarray:
        key = f"{path}|{factor:.4f}"
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            from cyto_edge.errors import BadInput

            raise BadInput(f"{path}: cannot read image (missing or corrupt); run `cyto-edge data check`")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if abs(factor - 1.0) > 1e-3:
            img = cv2.resize(img, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        self._d[key] = img
        self._bytes += img.nbytes
        while self._bytes > self.max_bytes and len(self._d) > 1:
            _, old = self._d.popitem(last=False)
            self._bytes -= old.nbytes
        return img


def normalize(img_rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 normalized, exactly as the runtime does."""
    return normalize_batch(img_rgb[None], MEAN, STD)[0]


def _colour(img: np.ndarray, aug: AugConfig, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-aug.hue, aug.hue) / 2) % 180
    hsv[..., 1] *= rng.uniform(1 - aug.saturation, 1 + aug.saturation)
    hsv[..., 2] *= rng.uniform(1 - aug.value, 1 + aug.value)
    out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)
    if aug.gamma > 0:
        g = rng.uniform(1 - aug.gamma, 1 + aug.gamma, 3)
        lut = np.stack([np.clip(255 * (np.arange(256) / 255.0) ** gi, 0, 255) for gi in g], 1).astype(np.uint8)
        out = np.stack([lut[out[..., c], c] for c in range(3)], -1)
    if rng.random() < aug.blur_p:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 1.5))
    if rng.random() < aug.noise_p:
        out = np.clip(out.astype(np.int16) + rng.normal(0, 4, out.shape).astype(np.int16), 0, 255).astype(np.uint8)
    return out


def _geometric(img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, aug: AugConfig):
    """Flips and 90° rotations of a square crop; boxes (K, 4) xyxy pixels."""
    S = img.shape[0]
    b = boxes.copy()
    if aug.flip and rng.random() < 0.5:
        img = img[:, ::-1]
        b[:, [0, 2]] = S - b[:, [2, 0]]
    if aug.flip and rng.random() < 0.5:
        img = img[::-1]
        b[:, [1, 3]] = S - b[:, [3, 1]]
    if aug.rot90:
        for _ in range(int(rng.integers(0, 4))):       # rotate 90° counter-clockwise
            img = np.rot90(img)
            b = np.stack([b[:, 1], S - b[:, 2], b[:, 3], S - b[:, 0]], 1)
    return np.ascontiguousarray(img), b


def sample_crop(img: np.ndarray, rec_boxes: np.ndarray, rec_labels: np.ndarray, size: int,
                rng: np.random.Generator, aug: AugConfig | None, train: bool = True):
    """One crop of `size` px. Returns (crop RGB uint8, boxes (K, 4) xyxy px, labels (K,), -1 = ignore)."""
    H, W = img.shape[:2]
    s = rng.uniform(*aug.scale) if (aug and train) else 1.0
    win = int(round(size / s))                              # source window side
    if len(rec_boxes) and aug and rng.random() < aug.pos_fraction:
        b = rec_boxes[rng.integers(len(rec_boxes))]
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        x0 = int(round(cx - rng.uniform(0.15, 0.85) * win))
        y0 = int(round(cy - rng.uniform(0.15, 0.85) * win))
    else:
        x0 = int(rng.integers(min(0, W - win), max(0, W - win) + 1))
        y0 = int(rng.integers(min(0, H - win), max(0, H - win) + 1))
    x0 = int(np.clip(x0, min(0, W - win), max(0, W - win)))
    y0 = int(np.clip(y0, min(0, H - win), max(0, H - win)))
    crop = np.empty((win, win, 3), np.uint8)
    crop[:] = PAD_RGB
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + win, W), min(y0 + win, H)
    crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
    if win != size:
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    boxes = np.zeros((0, 4), np.float32)
    labels = np.zeros(0, np.int64)
    if len(rec_boxes):
        bx = (rec_boxes - np.asarray([x0, y0, x0, y0], np.float32)) * (size / win)
        full = np.clip(bx[:, 2] - bx[:, 0], 0, None) * np.clip(bx[:, 3] - bx[:, 1], 0, None)
        cl = np.clip(bx, 0, size)
        vis = np.clip(cl[:, 2] - cl[:, 0], 0, None) * np.clip(cl[:, 3] - cl[:, 1], 0, None)
        frac = vis / np.maximum(full, 1e-6)
        min_vis = aug.min_visible if aug else 0.5
        keep = (vis > 4) & (frac > 0)
        boxes = cl[keep].astype(np.float32)
        labels = np.where(frac[keep] >= min_vis, rec_labels[keep], -1).astype(np.int64)
    if aug and train:
        crop, boxes = _geometric(crop, boxes, rng, aug)
        crop = _colour(crop, aug, rng)
    return crop, boxes, labels


class CropDataset(Dataset):
    """`length` random crops per epoch from a DetectionDataset, at the model's input size and scale."""

    def __init__(self, ds: DetectionDataset, input_size: int, model_um_per_px: float | None, length: int,
                 seed: int = 0, aug: AugConfig | None = None, cache_mb: float = 1500,
                 weights: np.ndarray | None = None):
        self.ds = ds
        self.size = input_size
        self.factor = 1.0
        if model_um_per_px and ds.um_per_px:
            self.factor = ds.um_per_px / model_um_per_px
        self.length = length
        self.seed = seed
        self.epoch = 0
        self.aug = aug
        self.cache = ImageCache(cache_mb)
        self.weights = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def record(self, rng: np.random.Generator) -> ImageRecord:
        n = len(self.ds.images)
        i = int(rng.choice(n, p=self.weights)) if self.weights is not None else int(rng.integers(n))
        return self.ds.images[i]

    def __getitem__(self, idx: int):
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        rec = self.record(rng)
        img = self.cache.get(str(rec.file), self.factor)
        boxes = rec.boxes * self.factor if len(rec.boxes) else rec.boxes
        crop, b, lab = sample_crop(img, boxes, rec.labels, self.size, rng, self.aug, train=self.aug is not None)
        multi_hot = np.zeros(self.ds.num_classes, np.float32)
        for c in rec.classes_present:
            multi_hot[c] = 1.0
        return {"image": torch.from_numpy(normalize(crop)), "boxes": torch.from_numpy(b / self.size),
                "labels": torch.from_numpy(lab), "boxed": bool(rec.boxed), "image_labels": torch.from_numpy(multi_hot)}


def collate(batch: list[dict]) -> dict:
    """Pad boxes to the largest count: boxes (N, G, 4) normalized xyxy, labels (N, G) (-1 ignore / pad),
    valid (N, G) for real labelled boxes, ignore (N, G) for cut objects."""
    N = len(batch)
    G = max(1, max(len(b["labels"]) for b in batch))
    boxes = torch.zeros(N, G, 4)
    labels = torch.full((N, G), -1, dtype=torch.long)
    present = torch.zeros(N, G, dtype=torch.bool)
    for i, b in enumerate(batch):
        k = len(b["labels"])
        if k:
            boxes[i, :k] = b["boxes"]
            labels[i, :k] = b["labels"]
            present[i, :k] = True
    valid = present & (labels >= 0)
    ignore = present & (labels < 0)
    return {"image": torch.stack([b["image"] for b in batch]), "boxes": boxes, "labels": labels.clamp(min=0),
            "valid": valid, "ignore": ignore, "boxed": torch.tensor([b["boxed"] for b in batch]),
            "image_labels": torch.stack([b["image_labels"] for b in batch])}


def balanced_weights(ds: DetectionDataset, power: float = 0.5) -> np.ndarray:
    """Image sampling weights that favour images holding rare classes (inverse class frequency^power)."""
    counts = ds.class_counts().astype(np.float64) + 1.0
    inv = (counts.max() / counts) ** power
    w = np.ones(len(ds.images))
    for i, im in enumerate(ds.images):
        if len(im.labels):
            w[i] = max(1.0, float(inv[im.labels].max()))
    return w


def steps_for_time(minutes: float, crops_per_s: float, batch: int) -> int:
    return max(1, int(math.floor(minutes * 60 * crops_per_s / batch)))
