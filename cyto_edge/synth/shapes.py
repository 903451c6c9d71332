"""Drawing primitives: contours, anti-aliased masks, texture tiles, and the Sprite a drawer returns.

Units: drawers think in µm and convert with `ppu` (pixels per µm = 1 / um_per_px). Inside a sprite,
coordinates are patch pixels (x right, y down) with the patch centre at `Patch.c`.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class Sprite:
    """One drawn object: its optical density patch and what it counts for."""

    od: np.ndarray              # (h, w, 3) float32 OD, BGR
    box: np.ndarray             # (4,) float xyxy in patch pixels: the labelled extent of the object
    nuclei: np.ndarray          # (k, 2) xy patch pixels: centre of every nucleus drawn
    cells: np.ndarray           # (m, 2) xy patch pixels: centre of every cell drawn

    @property
    def size(self) -> float:
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))


_HARMONICS = np.arange(2, 7, dtype=np.float64)
_TRIG: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}


def _trig(n: int):
    """cos t, sin t (n,) and cos kt, sin kt (5, n) for k = 2..6, cached per n."""
    if n not in _TRIG:
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        kt = _HARMONICS[:, None] * t[None]
        _TRIG[n] = (np.cos(t), np.sin(t), np.cos(kt), np.sin(kt))
    return _TRIG[n]


def contour(rng: np.random.Generator, rx: float, ry: float, angle: float, irregular: float,
            n: int = 40) -> np.ndarray:
    """Smooth closed contour (n, 2) around 0: an ellipse with random low harmonics of amplitude `irregular`."""
    ct, st, ckt, skt = _trig(n)
    if irregular > 0:
        amp = rng.normal(0, 1, 5) * (irregular / _HARMONICS ** 0.8)
        ph = rng.uniform(0, 2 * np.pi, 5)
        r = np.clip(1.0 + (amp * np.cos(ph)) @ ckt - (amp * np.sin(ph)) @ skt, 0.55, 1.5)
    else:
        r = 1.0
    c, s = np.cos(angle), np.sin(angle)
    x, y = rx * r * ct, ry * r * st
    return np.stack([x * c - y * s, x * s + y * c], 1)


def polygon(rng: np.random.Generator, rx: float, ry: float, angle: float, corners: int) -> np.ndarray:
    """Flat polygonal cell outline (corners, 2): the shape of a squamous cell."""
    step = 2 * np.pi / corners
    t = rng.uniform(0, 2 * np.pi) + np.arange(corners) * step + rng.uniform(-0.3, 0.3, corners) * step
    r = rng.uniform(0.82, 1.12, corners)
    return rotate(np.stack([rx * r * np.cos(t), ry * r * np.sin(t)], 1), angle)


def rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


class Patch:
    """A square-ish OD canvas for one sprite, centred on (cx, cy) = (half_w, half_h)."""

    def __init__(self, half_w: float, half_h: float):
        self.hw, self.hh = int(np.ceil(half_w)) + 2, int(np.ceil(half_h)) + 2
        self.od = np.zeros((2 * self.hh + 1, 2 * self.hw + 1, 3), np.float32)
        self.c = np.array([self.hw, self.hh], np.float64)

    @property
    def shape(self) -> tuple[int, int]:
        return self.od.shape[:2]

    def mask(self, pts: np.ndarray, at=(0.0, 0.0)) -> np.ndarray:
        """Anti-aliased filled polygon (h, w) float32 0..1; pts (n, 2) relative to the centre + `at`."""
        m = np.zeros(self.shape, np.uint8)
        p = np.round((pts + self.c + np.asarray(at)) * 16).astype(np.int32)
        cv2.fillPoly(m, [p], 255, lineType=cv2.LINE_AA, shift=4)
        return m.astype(np.float32) * (1.0 / 255.0)

    def lines(self, pts: np.ndarray, width: float, at=(0.0, 0.0)) -> np.ndarray:
        """Anti-aliased open polyline (h, w) float32 0..1 of the given width in pixels."""
        m = np.zeros(self.shape, np.uint8)
        p = np.round((pts + self.c + np.asarray(at)) * 16).astype(np.int32)
        cv2.polylines(m, [p], False, 255, thickness=max(1, int(round(width))), lineType=cv2.LINE_AA, shift=4)
        return m.astype(np.float32) * (1.0 / 255.0)

    def dots(self, xy: np.ndarray, radius: float) -> np.ndarray:
        """Anti-aliased discs (h, w) float32 0..1 at xy (n, 2) relative to the centre."""
        m = np.zeros(self.shape, np.uint8)
        r = max(1, int(round(radius * 16)))
        for x, y in np.round((xy + self.c) * 16).astype(np.int32):
            cv2.circle(m, (int(x), int(y)), r, 255, -1, lineType=cv2.LINE_AA, shift=4)
        return m.astype(np.float32) * (1.0 / 255.0)

    def paint(self, density: np.ndarray, vec: np.ndarray) -> None:
        """Add OD: density (h, w) (mask x texture, >= 0) times the stain vector (3,)."""
        self.od += density[..., None] * vec[None, None, :]

    def sprite(self, box_mask: np.ndarray, nuclei=(), cells=((0.0, 0.0),), thr: float = 0.25) -> Sprite:
        """Finish: the labelled box is the extent of `box_mask` > thr (patch pixels, xyxy); `nuclei`
        and `cells` are centres relative to the patch centre (pixels)."""
        ys, xs = np.nonzero(box_mask > thr)
        if len(xs) == 0:
            box = np.array([self.hw, self.hh, self.hw + 1, self.hh + 1], np.float64)
        else:
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
        nuc = np.asarray(nuclei, np.float64).reshape(-1, 2) + self.c
        cel = np.asarray(cells, np.float64).reshape(-1, 2) + self.c
        return Sprite(self.od, box, nuc, cel)


def edge(mask: np.ndarray, width: float) -> np.ndarray:
    """Inner rim of a mask (h, w): ~1 at the border fading inwards over `width` pixels."""
    k = max(3, int(round(width * 2)) | 1)
    return np.clip(mask - cv2.blur(mask, (k, k)), 0, 1) * 2.0


def periodic_blur(t: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a (n, n) tile that stays seamless when the tile repeats."""
    n = t.shape[0]
    pad = min(n, int(3 * sigma) + 1)
    big = np.tile(t, (3, 3))[n - pad:2 * n + pad, n - pad:2 * n + pad]
    return cv2.GaussianBlur(big, (0, 0), sigma)[pad:pad + n, pad:pad + n]


class Textures:
    """Per-image noise tiles (zero mean, unit std) at several grain sizes, cropped at random offsets."""

    TILE = 256
    PAD = 256  # crops up to PAD pixels are plain slices of the wrap-padded tile
    GRAINS = {"fine": 0.6, "grain": 1.2, "coarse": 2.2, "mottle": 6.0}

    def __init__(self, rng: np.random.Generator, ppu: float = 1.0):
        self.rng = rng
        self.tiles = {}
        for name, sigma_um in self.GRAINS.items():
            t = rng.normal(0, 1, (self.TILE, self.TILE)).astype(np.float32)
            t = periodic_blur(t, max(0.4, sigma_um * ppu))
            t -= t.mean()
            t = t / (t.std() + 1e-6)
            self.tiles[name] = np.tile(t, (2, 2))[:self.TILE + self.PAD, :self.TILE + self.PAD].copy()

    def get(self, grain: str, h: int, w: int) -> np.ndarray:
        """(h, w) float32 crop of the (periodic) tile at a random offset."""
        t = self.tiles[grain]
        y, x = self.rng.integers(0, self.TILE, 2)
        if h <= self.PAD and w <= self.PAD:
            return t[y:y + h, x:x + w]
        big = np.tile(t[:self.TILE, :self.TILE], (h // self.TILE + 2, w // self.TILE + 2))
        return big[y:y + h, x:x + w]
