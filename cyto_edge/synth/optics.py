"""The microscope and the camera: light through the stained layer, uneven illumination, defocus, noise.

`focus` (per image truth) is a defocus level in [0, 1]: 0 sharp, 1 very blurred; the Gaussian blur sigma
is `focus * FOCUS_SIGMA_UM` µm, i.e. `focus * FOCUS_SIGMA_UM / um_per_px` pixels.
"""
from __future__ import annotations

import cv2
import numpy as np

from cyto_edge.synth.stain import Stain

FOCUS_SIGMA_UM = 4.0


def transmit(od: np.ndarray, stain: Stain) -> np.ndarray:
    """(H, W, 3) OD -> (H, W, 3) float32 intensity 0..~1 under this image's light (flat field)."""
    out = cv2.exp(-od)
    out *= (stain.white * stain.exposure)[None, None, :]
    return out


def illumination(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 1) float32 uneven illumination: vignetting plus a linear gradient, ~0.7..1.05."""
    sh, sw = max(2, h // 16), max(2, w // 16)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    cx, cy = sw / 2 + rng.normal(0, sw * 0.08), sh / 2 + rng.normal(0, sh * 0.08)
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (0.25 * (sw ** 2 + sh ** 2))
    g = rng.normal(0, 0.04, 2)
    field = (1.0 - rng.uniform(0.04, 0.22) * r2) * (1.0 + g[0] * (xx / sw - 0.5) + g[1] * (yy / sh - 0.5))
    return cv2.resize(field.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)[..., None]


def defocus(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian defocus of an image (any dtype); no-op below a third of a pixel."""
    if sigma_px < 0.33:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigma_px)


def sensor(rng: np.random.Generator, intensity: np.ndarray, shot: float, read: float) -> np.ndarray:
    """(H, W, 3) float32 intensity 0..1 -> uint8 with shot (signal-dependent) and read noise, in DN."""
    dn = intensity * np.float32(255.0)
    noise = np.empty(dn.shape[:1] + (int(np.prod(dn.shape[1:])),), np.float32)  # one channel for randn
    cv2.setRNGSeed(int(rng.integers(0, 2 ** 31 - 1)))  # OpenCV's generator: fast, seeded from ours
    cv2.randn(noise, 0.0, 1.0)
    var = cv2.max(dn, 0.0) * np.float32(shot) + np.float32(read * read)
    dn += noise.reshape(dn.shape) * cv2.sqrt(var)
    return cv2.convertScaleAbs(cv2.max(dn, 0.0))  # round and saturate to uint8


def camera(rng: np.random.Generator, od: np.ndarray, stain: Stain, focus: float, ppu: float) -> np.ndarray:
    """The whole optical path for one field: (H, W, 3) OD -> (H, W, 3) uint8 BGR."""
    h, w = od.shape[:2]
    img = transmit(od, stain)
    img *= illumination(rng, h, w)
    img = defocus(img, focus * FOCUS_SIGMA_UM * ppu)
    return sensor(rng, img, shot=rng.uniform(0.05, 0.3), read=rng.uniform(0.6, 2.0))
