"""A field of view: plan what is in it, draw and place every object, count the truth, photograph it.

Coordinates: canvas pixels, x right, y down; boxes xyxy pixels. Labelled objects lie wholly inside the
field, never larger than `max_object_px` on their longer side, and overlap each other little (their
boxes share at most 25% of the smaller one); normal cells overlap them and each other freely.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from cyto_edge.runtime.taxonomy import DEFAULT_MAPPING, DEFAULT_ORGANISMS, most_severe
from cyto_edge.synth import cells, lesions, organisms, optics
from cyto_edge.synth.cells import Brush
from cyto_edge.synth.shapes import Sprite, Textures
from cyto_edge.synth.stain import Stain

DRAWERS = {
    "ascus": lesions.ascus, "asch": lesions.asch, "lsil": lesions.lsil, "hsil": lesions.hsil,
    "scc": lesions.scc, "agc": lesions.agc, "trichomonas": organisms.trichomonas,
    "candida": organisms.candida, "flora": organisms.flora, "herps": organisms.herps,
    "actinomyces": organisms.actinomyces,
}
#: How many objects of a class a field holds when the class is present (per ~1 mm² field).
COUNT_RANGE = {"ascus": (1, 3), "asch": (1, 3), "lsil": (1, 3), "hsil": (1, 4), "scc": (1, 2), "agc": (1, 2),
               "trichomonas": (1, 5), "candida": (1, 2), "flora": (1, 3), "herps": (1, 2), "actinomyces": (1, 1)}
KIND_P = {"lesion": 0.70, "nilm": 0.15, "sparse": 0.10, "empty": 0.05}


@dataclass
class FieldPlan:
    kind: str                          # lesion | nilm | sparse | empty
    labelled: list[str]                # class of every labelled object to draw
    squamous: int                      # normal superficial / intermediate squames
    metaplastic: int                   # normal metaplastic / parabasal cells
    neutrophils: int
    rbc: int
    debris: int
    focus: float                       # 0 sharp .. 1 very blurred (optics.FOCUS_SIGMA_UM)
    clump: float = 0.3                 # fraction of normal cells placed in clumps
    inflam_clusters: int = 0           # tight clusters of 8-50 neutrophils
    bacteria: bool = False             # coccobacilli over the background (shift in flora)


@dataclass
class Field:
    image: np.ndarray                  # (H, W, 3) uint8 BGR
    boxes: np.ndarray                  # (K, 4) float xyxy pixels of the labelled objects
    labels: list[str]                  # (K,) class names
    truth: dict = field(default_factory=dict)


def sample_focus(rng: np.random.Generator) -> float:
    u = rng.random()
    lo, hi = (0.0, 0.15) if u < 0.65 else (0.15, 0.45) if u < 0.9 else (0.45, 0.9)
    return round(float(rng.uniform(lo, hi)), 4)


def plan_field(rng: np.random.Generator, area_mm2: float, classes: list[str] | None = None,
               kind: str | None = None) -> FieldPlan:
    """What a field holds. `classes`: the labelled classes of a lesion field (drawn when None)."""
    kind = kind or str(rng.choice(list(KIND_P), p=list(KIND_P.values())))
    scale = max(area_mm2, 0.05)

    def n(lo: float, hi: float) -> int:
        return int(rng.poisson(rng.uniform(lo, hi) * scale))

    labelled: list[str] = []
    if kind == "lesion":
        if classes is None:
            classes = list(rng.choice(list(DRAWERS), size=int(rng.integers(1, 4)), replace=False))
        for c in classes:
            lo, hi = COUNT_RANGE[c]
            labelled += [c] * max(1, int(round(rng.integers(lo, hi + 1) * min(1.0, scale))))
    elif kind == "sparse" and classes:
        labelled = list(classes[:1])
    dense = kind in ("lesion", "nilm")
    return FieldPlan(
        kind=kind, labelled=labelled,
        squamous=n(110, 340) if dense else (int(rng.integers(2, 12)) if kind == "sparse" else 0),
        metaplastic=n(5, 40) if dense else (int(rng.integers(0, 3)) if kind == "sparse" else 0),
        neutrophils=(n(5, 120) if rng.random() < 0.5 else n(0, 15)) if kind != "empty" else 0,
        rbc=0 if kind == "empty" else n(20, 150) if rng.random() < 0.15 else n(0, 5),
        debris=n(5, 40), focus=sample_focus(rng), clump=float(rng.uniform(0.1, 0.6)),
        inflam_clusters=n(0, 8) if kind != "empty" and rng.random() < 0.6 else 0,
        bacteria="flora" in labelled and rng.random() < 0.7)


def render_field(rng: np.random.Generator, width: int, height: int, um_per_px: float, plan: FieldPlan,
                 max_object_px: float = 160.0, stain: Stain | None = None, textures: Textures | None = None) -> Field:
    """Draw a field as planned; boxes are exact, truth counts what was drawn inside the field.
    `textures` may be shared between fields (crop sets) to save their set-up time."""
    ppu = 1.0 / um_per_px
    stain = stain or Stain.sample(rng)
    canvas = Canvas(rng, width, height, ppu, stain, textures=textures)
    boxes, labels = canvas.place_labelled(plan.labelled, max_object_px)
    canvas.place_background(plan)
    image = optics.camera(rng, canvas.od, stain, plan.focus, ppu)
    organisms_present = sorted({c for c in labels if c in DEFAULT_ORGANISMS})
    grade = most_severe([DEFAULT_MAPPING[c] for c in labels if c not in DEFAULT_ORGANISMS])
    nuclei = sum(canvas.nuclei.values())
    truth = {"fov_grade": grade, "organisms": organisms_present, "squamous_count": canvas.squamous,
             "nuclei_count": nuclei, "nuclei": dict(canvas.nuclei), "focus": plan.focus,
             "empty": canvas.cells == 0, "kind": plan.kind,
             "counts": {c: labels.count(c) for c in sorted(set(labels))}}
    return Field(image, np.asarray(boxes, np.float64).reshape(-1, 4), labels, truth)


class Canvas:
    """The OD canvas of one field (or slide) and the bookkeeping of what was stamped on it."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, ppu: float, stain: Stain,
                 density: np.ndarray | None = None, textures: Textures | None = None):
        self.rng, self.w, self.h, self.ppu = rng, width, height, ppu
        if textures is not None:
            textures.rng = rng
        self.brush = Brush(rng, stain, textures or Textures(rng, ppu), ppu)
        self.od = background(rng, width, height, stain)
        self.density = density          # optional (gh, gw) map 0..1 where normal cells may lie
        self.taken: list[np.ndarray] = []   # labelled boxes placed so far
        self.squamous = 0
        self.cells = 0
        self.nuclei = {"squamous": 0, "labelled": 0, "inflammatory": 0}
        self.points: list[tuple[float, float, int, int]] = []  # (x, y, what, kind) every cell / nucleus drawn

    #: codes of `points`: what (cell or nucleus) and kind (normal squamous, labelled, inflammatory)
    CELL, NUCLEUS = 0, 1
    SQUAMOUS, LABELLED, INFLAMMATORY = 0, 1, 2

    def _log(self, s: Sprite, x0: int, y0: int, kind: int) -> None:
        for what, pts in ((self.CELL, s.cells), (self.NUCLEUS, s.nuclei)):
            for x, y in pts:
                self.points.append((float(x + x0), float(y + y0), what, kind))

    def stamp(self, s: Sprite, x0: int, y0: int) -> None:
        """Add a sprite's OD with its patch top-left at (x0, y0), clipped to the canvas."""
        h, w = s.od.shape[:2]
        cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(self.w, x0 + w), min(self.h, y0 + h)
        if cx1 <= cx0 or cy1 <= cy0:
            return
        self.od[cy0:cy1, cx0:cx1] += s.od[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]

    def inside(self, pts: np.ndarray, x0: int, y0: int) -> int:
        """How many of the sprite points (k, 2) patch px fall inside the canvas."""
        if len(pts) == 0:
            return 0
        q = pts + (x0, y0)
        return int(((q[:, 0] >= 0) & (q[:, 0] < self.w) & (q[:, 1] >= 0) & (q[:, 1] < self.h)).sum())

    def place_labelled(self, classes: list[str], max_px: float, tries: int = 25,
                       where: np.ndarray | None = None) -> tuple[list, list]:
        """Draw and place labelled objects; `where` (n, 2) optional preferred centres (px)."""
        boxes, labels = [], []
        for i, cls in enumerate(classes):
            s = self._draw_fitting(cls, max_px)
            if s is None:
                continue
            bw, bh = s.box[2] - s.box[0], s.box[3] - s.box[1]
            for t in range(tries):
                if where is not None and t < tries // 2:
                    cx, cy = where[i % len(where)] + self.rng.normal(0, 40 * self.ppu, 2)
                    bx0, by0 = cx - bw / 2, cy - bh / 2
                else:
                    bx0 = self.rng.uniform(2, max(3, self.w - bw - 2))
                    by0 = self.rng.uniform(2, max(3, self.h - bh - 2))
                x0, y0 = int(round(bx0 - s.box[0])), int(round(by0 - s.box[1]))
                box = s.box + (x0, y0, x0, y0)
                if box[0] < 1 or box[1] < 1 or box[2] > self.w - 1 or box[3] > self.h - 1:
                    continue
                if self.density is not None and self._density_at((box[:2] + box[2:]) / 2) < 0.05:
                    continue  # never in an empty region of a slide
                if self.taken and _max_ioa(box, self.taken) > 0.25:
                    continue
                self.stamp(s, x0, y0)
                self.taken.append(box)
                boxes.append(box.tolist())
                labels.append(cls)
                self.nuclei["labelled"] += self.inside(s.nuclei, x0, y0)
                self.cells += max(1, self.inside(s.cells, x0, y0))
                self._log(s, x0, y0, self.LABELLED)
                break
        return boxes, labels

    def _draw_fitting(self, cls: str, max_px: float, tries: int = 12) -> Sprite | None:
        """A sprite no longer than max_px. After half the tries the object is drawn physically smaller
        (a shorter hypha, a smaller group): at high magnification the largest objects would not fit."""
        b = self.brush
        for t in range(tries):
            shrink = 1.0 if t < tries // 2 else 0.85 ** (t - tries // 2 + 1)
            s = DRAWERS[cls](b if shrink == 1.0 else Brush(b.rng, b.stain, b.tex, b.ppu * shrink))
            if s.size <= max_px:
                return s
        return None

    def place_background(self, plan: FieldPlan) -> None:
        """The unlabelled population: normal cells (clumped), inflammation, blood, debris, bacteria."""
        kinds = ([cells.squamous] * plan.squamous + [cells.metaplastic] * plan.metaplastic
                 + [cells.neutrophil] * plan.neutrophils)
        pos = self.positions(len(kinds), plan.clump)
        for c in self.positions(plan.inflam_clusters, 0.0):  # inflammatory clusters
            k = int(self.rng.integers(8, 51))
            pos = np.concatenate([pos, c + self.rng.normal(0, 3.0 * np.sqrt(k) * self.ppu, (k, 2))])
            kinds += [cells.neutrophil] * k
        for draw, (cx, cy) in zip(kinds, pos):
            s = draw(self.brush)
            x0, y0 = int(round(cx - s.cells[0, 0])), int(round(cy - s.cells[0, 1]))
            self.stamp(s, x0, y0)
            n_in = self.inside(s.cells, x0, y0)
            self.cells += n_in
            if draw is cells.neutrophil:
                self.nuclei["inflammatory"] += self.inside(s.nuclei, x0, y0)
                self._log(s, x0, y0, self.INFLAMMATORY)
            else:
                self.squamous += n_in
                self.nuclei["squamous"] += self.inside(s.nuclei, x0, y0)
                self._log(s, x0, y0, self.SQUAMOUS)
        for draw, k in ((cells.rbc, plan.rbc), (cells.debris, plan.debris)):
            for cx, cy in self.positions(k, 0.0, avoid=False):
                s = draw(self.brush)
                self.stamp(s, int(cx - s.od.shape[1] / 2), int(cy - s.od.shape[0] / 2))
        if plan.bacteria:
            sprinkle_bacteria(self)

    def positions(self, n: int, clump: float, avoid: bool = True) -> np.ndarray:
        """(n, 2) centres: uniform (under the density map) or around clump centres; with `avoid`, never
        inside a labelled box (so a normal cell never hides a labelled one completely)."""
        rng, out = self.rng, []
        seeds = rng.uniform((0, 0), (self.w, self.h), (max(1, n // 12), 2))
        for _ in range(n):
            for _t in range(8):
                if rng.random() < clump:
                    p = seeds[rng.integers(len(seeds))] + rng.normal(0, 30 * self.ppu, 2)
                else:
                    p = rng.uniform((0, 0), (self.w, self.h))
                if self.density is not None and rng.random() > self._density_at(p):
                    continue
                if avoid and any(b[0] < p[0] < b[2] and b[1] < p[1] < b[3] for b in self.taken):
                    continue
                out.append(p)
                break
        return np.asarray(out, np.float64).reshape(-1, 2)

    def _density_at(self, p: np.ndarray) -> float:
        gh, gw = self.density.shape
        gx = min(gw - 1, max(0, int(p[0] / self.w * gw)))
        gy = min(gh - 1, max(0, int(p[1] / self.h * gh)))
        return float(self.density[gy, gx])


def _max_ioa(box: np.ndarray, others: list[np.ndarray]) -> float:
    o = np.asarray(others)
    iw = np.clip(np.minimum(box[2], o[:, 2]) - np.maximum(box[0], o[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], o[:, 3]) - np.maximum(box[1], o[:, 1]), 0, None)
    a = (box[2] - box[0]) * (box[3] - box[1])
    ao = (o[:, 2] - o[:, 0]) * (o[:, 3] - o[:, 1])
    return float((iw * ih / np.maximum(np.minimum(a, ao), 1e-6)).max())


def background(rng: np.random.Generator, width: int, height: int, stain: Stain) -> np.ndarray:
    """(H, W, 3) float32 OD of the slide background: a faint proteinaceous haze of low frequency."""
    gh, gw = max(2, height // 48), max(2, width // 48)
    cloud = cv2.resize(rng.random((gh, gw)).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    level = rng.uniform(0.0, 0.06)
    vec = stain.cytoplasm(rng) * level
    return (np.clip(cloud, 0, 1)[..., None] * vec[None, None, :]).astype(np.float32)


def sprinkle_bacteria(c: Canvas) -> None:
    """Coccobacilli scattered over the whole field (a shift in vaginal flora), unlabelled."""
    h, w = c.h, c.w
    dots = np.zeros((h, w), np.uint8)
    n = int(h * w / (c.ppu ** 2) * c.rng.uniform(0.002, 0.006))
    xy = c.rng.uniform((0, 0), (w, h), (n, 2)).astype(np.int32)
    dots[xy[:, 1], xy[:, 0]] = 255
    dots = cv2.GaussianBlur(dots, (3, 3), 0.7).astype(np.float32) / 255.0
    c.od += dots[..., None] * c.brush.stain.nuclear(c.rng, 1.2)[None, None, :] * 1.5
