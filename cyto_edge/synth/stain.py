"""Papanicolaou stain model in optical density (Beer-Lambert), varied per image.

Every stained structure adds optical density OD = concentration x stain vector (per colour channel);
the camera sees `illumination * exp(-sum OD)`, so overlapping cells darken the way thin-layer preparations
do. Stain vectors are in BGR channel order (OpenCV's), units of OD per unit concentration.

Colour is *not* a class cue: every cell of every class draws its cytoplasm mixture from `cytoplasm()` and
its nuclear stain from `nuclear()`; the classes differ by morphology (size, N:C ratio, chromatin pattern,
contour, halo, arrangement) and by how much stain a nucleus holds (hyperchromasia), which normal pyknotic
nuclei share.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _od_bgr(rgb: tuple[float, float, float]) -> np.ndarray:
    """Transmitted RGB colour (0..1) of a unit layer -> OD vector (3,) in BGR order."""
    r, g, b = rgb
    return -np.log(np.array([b, g, r], np.float64)).astype(np.float32)


# Reference colours of a unit layer of each dye, as seen in transmitted light.
HEMATOXYLIN = _od_bgr((0.38, 0.32, 0.62))   # nuclei: blue-purple
LIGHT_GREEN = _od_bgr((0.55, 0.80, 0.77))   # cyanophilic cytoplasm: blue-green
EOSIN = _od_bgr((0.93, 0.60, 0.74))         # eosinophilic cytoplasm: pink
ORANGE_G = _od_bgr((0.97, 0.74, 0.45))      # keratin: orange

#: Probability of the dominant cytoplasmic dye of a cell (the same for every class).
CYTO_DOMINANT_P = (0.55, 0.33, 0.12)        # light green, eosin, orange G
_CYTO_CUM = np.cumsum(CYTO_DOMINANT_P)[:-1]


@dataclass
class Stain:
    """The stain of one image (or slide): dye vectors after per-image variation, and the light."""

    hema: np.ndarray        # (3,) OD BGR of a unit nuclear layer
    dyes: np.ndarray        # (3, 3) rows: light green, eosin, orange G (OD BGR)
    cyto_scale: float       # overall cytoplasm staining intensity of this image
    nuc_scale: float        # overall nuclear staining intensity of this image
    white: np.ndarray       # (3,) BGR illumination colour, ~1.0
    exposure: float         # overall brightness factor

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Stain":
        def vary(v: np.ndarray, s: float) -> np.ndarray:
            return (v * np.exp(rng.normal(0.0, s, 3))).astype(np.float32)

        dyes = np.stack([vary(LIGHT_GREEN, 0.15), vary(EOSIN, 0.15), vary(ORANGE_G, 0.15)])
        white = np.clip(1.0 + rng.normal(0.0, 0.035, 3), 0.9, 1.08).astype(np.float32)
        return cls(hema=vary(HEMATOXYLIN, 0.12), dyes=dyes,
                   cyto_scale=float(np.exp(rng.normal(0.0, 0.22))),
                   nuc_scale=float(np.exp(rng.normal(0.0, 0.15))),
                   white=white, exposure=float(rng.uniform(0.9, 1.02)))

    def cytoplasm(self, rng: np.random.Generator, density: float | None = None) -> np.ndarray:
        """OD vector (3,) of one cell's cytoplasm: a dye mixture and a thickness drawn from the shared
        distributions (`density` overrides the thickness, for things that are not cells: debris)."""
        if density is None:
            density = float(np.clip(np.exp(rng.normal(0.05, 0.3)), 0.5, 2.0))
        dom = int(np.searchsorted(_CYTO_CUM, rng.random(), side="right"))
        g = rng.gamma(0.6, 1.0, 3) + 1e-9
        w = g / g.sum() * rng.uniform(0.0, 0.45)
        w[dom] += 1.0 - w.sum()
        conc = rng.uniform(0.32, 0.72) * self.cyto_scale * density
        return (conc * (w @ self.dyes)).astype(np.float32)

    def nuclear(self, rng: np.random.Generator, darkness: float) -> np.ndarray:
        """OD vector (3,) of one nucleus; `darkness` ~0.5 vesicular .. 1.5 pyknotic / hyperchromatic."""
        tint = np.exp(rng.normal(0.0, 0.06, 3)).astype(np.float32)
        return (self.hema * tint * darkness * self.nuc_scale * rng.uniform(0.9, 1.1)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"hema": self.hema.round(4).tolist(), "dyes": self.dyes.round(4).tolist(),
                "cyto_scale": round(self.cyto_scale, 4), "nuc_scale": round(self.nuc_scale, 4),
                "white": self.white.round(4).tolist(), "exposure": round(self.exposure, 4)}
