"""Cell painting helpers and the unlabelled background population (normal cells, inflammation, debris).

All sizes are in µm and converted with `Brush.ppu` (pixels per µm). Normal cells are never labelled (as in
CDetector) but are counted in the per-image truth (`squamous_count`, `nuclei_count`).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cyto_edge.synth.shapes import Patch, Sprite, Textures, contour, edge, polygon
from cyto_edge.synth.stain import Stain

# Chromatin patterns: texture grain, texture amplitude, rim (membrane / margination) strength.
CHROMATIN = {
    "pyknotic": ("fine", 0.06, 0.05),
    "fine": ("fine", 0.22, 0.35),
    "granular": ("grain", 0.45, 0.30),
    "coarse": ("coarse", 0.95, 0.20),
    "glass": ("fine", 0.04, 1.10),
}


@dataclass
class Brush:
    """What every drawer needs: randomness, this image's stain and textures, and the scale."""

    rng: np.random.Generator
    stain: Stain
    tex: Textures
    ppu: float  # pixels per µm

    def um(self, lo: float, hi: float | None = None) -> float:
        """A length in pixels: `lo` µm, or uniform in [lo, hi] µm."""
        return (lo if hi is None else self.rng.uniform(lo, hi)) * self.ppu


def cytoplasm(p: Patch, b: Brush, outline: np.ndarray, density: float | None = None, smooth: float = 0.18,
              rim: float = 0.35, folds: float = 0.3, at=(0.0, 0.0)) -> np.ndarray:
    """Paint a cell body (outline (n, 2) px relative to the centre + at); returns its mask (h, w)."""
    m = p.mask(outline, at)
    if m.shape[0] > 8:
        m = cv2.GaussianBlur(m, (3, 3), 0.6)
    h, w = p.shape
    dens = m * np.clip(1.0 + smooth * b.tex.get("mottle", h, w) + 0.5 * smooth * b.tex.get("grain", h, w), 0.3, None)
    dens += rim * edge(m, 1.5 * b.ppu) * m
    if b.rng.random() < folds:
        dens += 0.6 * _fold(p, b, outline, at) * m
    p.paint(dens, b.stain.cytoplasm(b.rng, density))
    return m


def _fold(p: Patch, b: Brush, outline: np.ndarray, at) -> np.ndarray:
    """A curved fold line across part of a flat cell."""
    r = np.abs(outline).max(0)
    a0 = b.rng.uniform(-0.6, 0.6, 2) * r
    a1 = b.rng.uniform(-0.6, 0.6, 2) * r
    mid = (a0 + a1) / 2 + b.rng.normal(0, 0.15, 2) * r
    t = np.linspace(0, 1, 12)[:, None]
    pts = (1 - t) ** 2 * a0 + 2 * (1 - t) * t * mid + t ** 2 * a1
    line = p.lines(pts, max(1.0, b.um(0.8, 1.8)), at)
    return cv2.GaussianBlur(line, (0, 0), 0.8)


def nucleus(p: Patch, b: Brush, rx: float, ry: float, darkness: float, chromatin: str = "fine",
            irregular: float = 0.03, angle: float | None = None, at=(0.0, 0.0),
            clip: np.ndarray | None = None, nucleolus: float = 0.0) -> np.ndarray:
    """Paint a nucleus of radii (rx, ry) px at `at` (px from the centre); returns its mask (h, w)."""
    ang = b.rng.uniform(0, np.pi) if angle is None else angle
    m = p.mask(contour(b.rng, rx, ry, ang, irregular), at)
    if clip is not None:
        m = m * clip
    grain, amp, rim = CHROMATIN[chromatin]
    h, w = p.shape
    t = b.tex.get(grain, h, w)
    if chromatin == "coarse":  # clumped chromatin with clear parachromatin
        t = np.where(t > 0, t * 1.4, t * 0.7)
    dens = m * np.clip(1.0 + amp * t, 0.12, None)
    dens += rim * edge(m, max(1.0, 0.9 * b.ppu)) * m
    if nucleolus > 0 and b.rng.random() < nucleolus:
        off = b.rng.normal(0, 0.3, 2) * (rx, ry)
        dens += 0.9 * p.dots(np.array([at]) + off, max(0.7, b.um(0.7, 1.1)))
    p.paint(dens, b.stain.nuclear(b.rng, darkness))
    return m


def squamous(b: Brush) -> Sprite:
    """Normal superficial (pyknotic nucleus) or intermediate (vesicular nucleus) cell, 35-60 µm."""
    rng = b.rng
    rx = b.um(18, 27)
    ry = rx * rng.uniform(0.68, 1.0)
    out = polygon(rng, rx, ry, rng.uniform(0, np.pi), int(rng.integers(5, 9)))
    p = Patch(*np.abs(out).max(0))
    m = cytoplasm(p, b, out)
    at = rng.normal(0, 0.12, 2) * (rx, ry)
    if rng.random() < 0.45:
        r = b.um(2.3, 3.0)
        nucleus(p, b, r, r * rng.uniform(0.85, 1.0), rng.uniform(1.25, 1.65), "pyknotic", 0.02, at=at)
    else:
        r = b.um(3.0, 4.0)
        nucleus(p, b, r, r * rng.uniform(0.8, 1.0), rng.uniform(0.55, 0.85), "fine", 0.03, at=at)
    return p.sprite(m, [at])


def metaplastic(b: Brush) -> Sprite:
    """Normal squamous metaplastic / parabasal cell: round, dense cytoplasm, 15-28 µm, low N:C."""
    rng = b.rng
    rx = b.um(7.5, 14)
    out = contour(rng, rx, rx * rng.uniform(0.75, 1.0), rng.uniform(0, np.pi), 0.08)
    p = Patch(*np.abs(out).max(0))
    m = cytoplasm(p, b, out, folds=0.0)
    r = min(b.um(3.4, 4.4), 0.45 * rx)
    at = rng.normal(0, 0.1, 2) * rx
    nucleus(p, b, r, r * rng.uniform(0.8, 1.0), rng.uniform(0.6, 0.95), "fine", 0.03, at=at)
    return p.sprite(m, [at])


def neutrophil(b: Brush) -> Sprite:
    """Neutrophil: faint round cytoplasm and a 2-4-lobed dark nucleus (counted as one nucleus)."""
    rng = b.rng
    r = b.um(4.5, 6.0)
    p = Patch(r, r)
    m = cytoplasm(p, b, contour(rng, r, r, 0, 0.05), density=0.35, rim=0.1, folds=0.0)
    n = int(rng.integers(2, 5))
    a0, step = rng.uniform(0, 2 * np.pi), rng.uniform(0.9, 1.4)
    for i in range(n):
        a = a0 + i * step
        at = (0.45 * r * np.cos(a), 0.45 * r * np.sin(a))
        lobe = b.um(1.3, 1.8)
        nucleus(p, b, lobe, lobe * 0.85, rng.uniform(1.1, 1.5), "pyknotic", 0.02, at=at)
    return p.sprite(m, [(0.0, 0.0)])


def rbc(b: Brush) -> Sprite:
    """Red blood cell: a pale pink-orange disc with a lighter centre; no nucleus."""
    rng = b.rng
    r = b.um(3.3, 3.9)
    p = Patch(r, r)
    m = p.mask(contour(rng, r, r, 0, 0.03))
    core = p.mask(contour(rng, 0.45 * r, 0.45 * r, 0, 0.05))
    vec = (0.5 * b.stain.dyes[1] + 0.5 * b.stain.dyes[2]) * rng.uniform(0.35, 0.6)
    p.paint(m - 0.5 * core, vec.astype(np.float32))
    return p.sprite(m, [], [])


def debris(b: Brush) -> Sprite:
    """Unlabelled debris: an irregular blob, a bare nucleus-like speck or a thin fibre."""
    rng = b.rng
    kind = rng.choice(3, p=(0.5, 0.2, 0.3))
    if kind == 2:  # fibre / mucus strand fragment
        n = 10
        length = b.um(15, 60)
        ang = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.2, n))
        pts = np.cumsum(np.stack([np.cos(ang), np.sin(ang)], 1) * length / n, 0)
        pts -= pts.mean(0)
        p = Patch(*np.abs(pts).max(0) + 2)
        m = cv2.GaussianBlur(p.lines(pts, max(1.0, b.um(0.8, 2.0))), (0, 0), 0.8)
        p.paint(m * rng.uniform(0.4, 0.9), b.stain.cytoplasm(rng))
        return p.sprite(m, [], [])
    r = b.um(1.5, 6.0) if kind == 0 else b.um(1.0, 2.5)
    out = contour(rng, r, r * rng.uniform(0.5, 1.0), rng.uniform(0, np.pi), 0.25)
    p = Patch(*np.abs(out).max(0))
    m = p.mask(out)
    vec = b.stain.cytoplasm(rng, 1.6) if kind == 0 else b.stain.nuclear(rng, rng.uniform(0.5, 1.2))
    p.paint(m * np.clip(1 + 0.4 * b.tex.get("grain", *p.shape), 0.2, None), vec)
    return p.sprite(m, [], [])
