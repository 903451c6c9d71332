"""SSD prior (default) boxes, in numpy, shared by training and the bundle.

Eq. 4 of the LD-WSCCD paper, corrected toward SSD (Liu et al. 2016); deviations from the printed text:

1. Scale of level k (k = 1..m): s_k = s_min + (s_max - s_min) (k - 1) / (m - 1), s_min 0.2, s_max 0.9
   (the printed "k in (1, m)" is the closed range [1, m]).
2. Box height: h = s_k / sqrt(a_r). The text prints h = s_k sqrt(a_r), which would make every box square.
3. The extra 1:1 box has scale s'_k = sqrt(s_k s_{k+1}); for the last level s_{m+1} = 1.0, as in
   torchvision's DefaultBoxGenerator (the text leaves it undefined).
4. Centres are ((j + 0.5) / f_w, (i + 0.5) / f_h) for a possibly non-square f_h x f_w map (the text
   writes |k| for the map size f_k).
5. Scales are fractions of min(H, W) of the model input, so boxes stay square-true on non-square inputs.
6. `scales` may be given explicitly (m + 1 values): cytology needs a smallest prior that covers the
   smallest organism at the model's µm/px, which s_min = 0.2 (64 px at 320) does not.

Contract: priors are float32 (P, 4) as (cx, cy, w, h) normalized to [0, 1] by the input width/height,
ordered level by level, then row-major over the feature map, then anchor within a cell: the order of
`head.permute(0, 2, 3, 1).reshape(N, -1, 4)` over the levels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

VARIANCES: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)


@dataclass
class PriorSpec:
    input_size: tuple[int, int]                    # (H, W) of the model input
    feature_sizes: list[tuple[int, int]]           # (h, w) of each prediction level
    aspect_ratios: list[list[float]] = field(default_factory=list)  # per level; each a adds a and 1/a
    s_min: float = 0.2
    s_max: float = 0.9
    scales: list[float] | None = None              # m + 1 explicit scales (overrides s_min / s_max)
    clip: bool = True

    def level_scales(self) -> list[float]:
        m = len(self.feature_sizes)
        if self.scales is not None:
            if len(self.scales) != m + 1:
                raise ValueError(f"scales needs {m + 1} values for {m} levels, got {len(self.scales)}")
            return [float(s) for s in self.scales]
        if m == 1:
            return [self.s_min, 1.0]
        return [self.s_min + (self.s_max - self.s_min) * k / (m - 1) for k in range(m)] + [1.0]

    def ratios(self) -> list[list[float]]:
        if self.aspect_ratios:
            if len(self.aspect_ratios) != len(self.feature_sizes):
                raise ValueError("aspect_ratios needs one list per feature level")
            return [list(r) for r in self.aspect_ratios]
        return [[2.0, 3.0]] * len(self.feature_sizes)

    def anchors_per_level(self) -> list[int]:
        return [2 + 2 * len(r) for r in self.ratios()]

    def to_dict(self) -> dict:
        return {"input_size": list(self.input_size), "feature_sizes": [list(f) for f in self.feature_sizes],
                "aspect_ratios": self.ratios(), "scales": self.level_scales(), "clip": self.clip}


def level_shapes(spec: PriorSpec) -> list[np.ndarray]:
    """Per level, the (A, 2) normalized (w, h) of its anchors, in anchor order."""
    H, W = spec.input_size
    side = min(H, W)
    sx, sy = side / W, side / H  # fraction of min side -> fraction of width / height
    s = spec.level_scales()
    out = []
    for k, ratios in enumerate(spec.ratios()):
        sk, sk1 = s[k], math.sqrt(s[k] * s[k + 1])
        wh = [(sk, sk), (sk1, sk1)]
        for a in ratios:
            r = math.sqrt(a)
            wh += [(sk * r, sk / r), (sk / r, sk * r)]
        arr = np.asarray(wh, dtype=np.float64)
        arr[:, 0] *= sx
        arr[:, 1] *= sy
        out.append(arr)
    return out


def make_priors(spec: PriorSpec) -> np.ndarray:
    """All priors of a spec: float32 (P, 4) normalized (cx, cy, w, h)."""
    parts = []
    for (fh, fw), shapes in zip(spec.feature_sizes, level_shapes(spec)):
        cy, cx = np.meshgrid((np.arange(fh) + 0.5) / fh, (np.arange(fw) + 0.5) / fw, indexing="ij")
        centres = np.stack([cx.ravel(), cy.ravel()], 1)                      # (hw, 2)
        A = len(shapes)
        c = np.repeat(centres, A, axis=0)                                     # (hw*A, 2)
        wh = np.tile(shapes, (fh * fw, 1))                                    # (hw*A, 2)
        parts.append(np.concatenate([c, wh], 1))
    pri = np.concatenate(parts, 0)
    if spec.clip:
        pri = np.clip(pri, 0.0, 1.0)
    return pri.astype(np.float32)
