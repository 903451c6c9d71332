"""Abnormal squamous and glandular cells: the labelled lesion classes.

Each class differs from normal cells and from its neighbours by morphology (Bethesda criteria):
- ascus: intermediate-sized squame, nucleus 2.5-3x the normal intermediate nuclear area, mild
  hyperchromasia, smooth or slightly irregular contour;
- lsil: koilocyte: large squame with a sharp perinuclear halo and a dense rim, enlarged raisinoid
  nucleus, often two;
- asch: small metaplastic-sized cell with high N:C (nucleus ~0.5-0.7 of the cell), fine-granular chromatin;
- hsil: small cell, very high N:C (0.7-0.9), hyperchromatic coarse chromatin, irregular contour, alone
  or in small syncytial groups (one box per group);
- scc: pleomorphic (tadpole, spindle, bizarre), dense keratinized cytoplasm, irregular ink-dark nuclei;
- agc: glandular cells in a strip (picket fence) or a crowded group with eccentric nuclei (one box per group).
Cytoplasm and nuclear colours come from the shared stain distributions (stain.py).
"""
from __future__ import annotations

import numpy as np

from cyto_edge.synth.cells import Brush, cytoplasm, nucleus
from cyto_edge.synth.shapes import Patch, Sprite, contour, edge, polygon, rotate

NORMAL_NUCLEUS_D_UM = 7.0  # a normal intermediate nucleus, the reference for "enlarged"


def ascus(b: Brush) -> Sprite:
    rng = b.rng
    rx = b.um(17, 26)
    ry = rx * rng.uniform(0.7, 1.0)
    out = polygon(rng, rx, ry, rng.uniform(0, np.pi), int(rng.integers(5, 9)))
    p = Patch(*np.abs(out).max(0))
    m = cytoplasm(p, b, out)
    r = 0.5 * b.um(NORMAL_NUCLEUS_D_UM) * np.sqrt(rng.uniform(2.5, 3.0))
    at = rng.normal(0, 0.1, 2) * (rx, ry)
    nucleus(p, b, r * rng.uniform(1.0, 1.15), r * rng.uniform(0.8, 0.95), rng.uniform(0.85, 1.1),
            "granular", rng.uniform(0.03, 0.07), at=at)
    return p.sprite(m, [at])


def lsil(b: Brush) -> Sprite:
    rng = b.rng
    rx = b.um(20, 30)
    ry = rx * rng.uniform(0.72, 1.0)
    out = polygon(rng, rx, ry, rng.uniform(0, np.pi), int(rng.integers(5, 9)))
    p = Patch(*np.abs(out).max(0))
    centre = rng.normal(0, 0.06, 2) * (rx, ry)
    halo_r = min(rx, ry) * rng.uniform(0.5, 0.68)
    halo = p.mask(contour(rng, halo_r, halo_r * rng.uniform(0.75, 1.0), rng.uniform(0, np.pi), 0.1), centre)
    m = _koilocyte_body(p, b, out, halo)
    two = rng.random() < 0.35
    r = b.um(5.5, 7.5) * (0.85 if two else 1.0)
    nuclei = []
    for k in range(2 if two else 1):
        at = centre + (np.array([(-1) ** k * r * 0.95, 0.0]) if two else 0.0)
        nucleus(p, b, r * rng.uniform(0.95, 1.1), r * rng.uniform(0.75, 0.95), rng.uniform(0.9, 1.25),
                "granular", rng.uniform(0.1, 0.16), at=at)
        nuclei.append(at)
    return p.sprite(m, nuclei)


def _koilocyte_body(p: Patch, b: Brush, out: np.ndarray, halo: np.ndarray) -> np.ndarray:
    """Cytoplasm cleared inside the halo, with condensed cytoplasm at its border; returns the cell mask."""
    before = p.od.copy()
    m = cytoplasm(p, b, out, folds=0.1)
    added = p.od - before
    ring = np.clip(edge(1.0 - halo, 2.0 * b.ppu), 0, 1) * m
    p.od = before + added * (1.0 - 0.9 * halo)[..., None] + added * (1.2 * ring)[..., None]
    return m


def asch(b: Brush) -> Sprite:
    rng = b.rng
    rx = b.um(8, 12.5)
    out = contour(rng, rx, rx * rng.uniform(0.78, 1.0), rng.uniform(0, np.pi), 0.08)
    p = Patch(*np.abs(out).max(0))
    m = cytoplasm(p, b, out, folds=0.0)
    r = rx * rng.uniform(0.52, 0.66)
    at = rng.normal(0, 0.08, 2) * rx
    nucleus(p, b, r, r * rng.uniform(0.8, 0.95), rng.uniform(0.85, 1.1), "granular", rng.uniform(0.04, 0.08), at=at)
    return p.sprite(m, [at])


def hsil(b: Brush) -> Sprite:
    rng = b.rng
    n = 1 if rng.random() < 0.65 else int(rng.integers(2, 5))
    rxs = [b.um(7.5, 11.5) for _ in range(n)]
    spread = 0.0 if n == 1 else max(rxs) * 1.1
    offs = [np.zeros(2)] + [rng.normal(0, 0.7, 2) * spread for _ in range(n - 1)]
    p = Patch(max(np.abs(o).max() + r * 1.6 for o, r in zip(offs, rxs)),
              max(np.abs(o).max() + r * 1.6 for o, r in zip(offs, rxs)))
    union, nuclei = np.zeros(p.shape, np.float32), []
    for o, rx in zip(offs, rxs):
        out = contour(rng, rx, rx * rng.uniform(0.75, 1.0), rng.uniform(0, np.pi), 0.1)
        union = np.maximum(union, cytoplasm(p, b, out, folds=0.0, at=o))
        r = rx * rng.uniform(0.72, 0.86)
        at = o + rng.normal(0, 0.05, 2) * rx
        nucleus(p, b, r, r * rng.uniform(0.75, 0.95), rng.uniform(1.2, 1.55), "coarse", rng.uniform(0.1, 0.16), at=at)
        nuclei.append(at)
    return p.sprite(union, nuclei, offs)


def scc(b: Brush) -> Sprite:
    rng = b.rng
    kind = rng.choice(3, p=(0.35, 0.35, 0.3))
    ang = rng.uniform(0, 2 * np.pi)
    if kind == 0:  # tadpole: round head, tapering tail
        head, tail = b.um(10, 16), b.um(35, 85)
        out, head_at = _tadpole(head, tail, rng.uniform(0.35, 0.6), ang)
        nuc = dict(rx=head * rng.uniform(0.45, 0.6), ry=head * rng.uniform(0.35, 0.5), at=head_at)
    elif kind == 1:  # spindle
        rx, ry = b.um(24, 55), b.um(5, 10)
        out = contour(rng, rx, ry, ang, 0.05)
        nuc = dict(rx=min(b.um(6, 12), rx * 0.5), ry=ry * rng.uniform(0.5, 0.7), at=np.zeros(2))
    else:  # bizarre pleomorphic cell
        rx = b.um(14, 30)
        out = contour(rng, rx, rx * rng.uniform(0.5, 0.9), ang, 0.22)
        nuc = dict(rx=rx * rng.uniform(0.3, 0.42), ry=rx * rng.uniform(0.22, 0.34), at=rng.normal(0, 0.1, 2) * rx)
    p = Patch(*np.abs(out).max(0))
    m = cytoplasm(p, b, out, smooth=0.06, rim=0.6, folds=0.0)
    nucleus(p, b, nuc["rx"], nuc["ry"], rng.uniform(1.35, 1.8), "coarse", rng.uniform(0.15, 0.25),
            angle=ang, at=nuc["at"], nucleolus=0.4)
    return p.sprite(m, [nuc["at"]], [nuc["at"]])


def _tadpole(head: float, tail: float, attach: float, ang: float) -> tuple[np.ndarray, np.ndarray]:
    """Outline (n, 2) px of a head circle with a tail along -x, centred on its box and rotated by `ang`;
    and the head centre (2,) in the same frame. `attach` (rad) is the half-angle where the tail joins."""
    t = np.linspace(-(np.pi - attach), np.pi - attach, 28)
    arc = np.stack([head * np.cos(t), head * np.sin(t)], 1)
    x0, y0 = -head * np.cos(attach), head * np.sin(attach)
    s = np.linspace(0, 1, 9)[1:-1]
    top = np.stack([x0 - s * (tail + x0 + head), y0 * (1 - s) ** 1.3], 1)
    tip = np.array([[-head - tail, 0.0]])
    bottom = top[::-1] * (1, -1)
    out = np.concatenate([arc, top, tip, bottom])
    shift = (out.max(0) + out.min(0)) / 2
    return rotate(out - shift, ang), rotate((-shift)[None], ang)[0]


def agc(b: Brush) -> Sprite:
    """Atypical glandular cells: a picket-fence strip or a crowded group; one box for the group."""
    rng = b.rng
    strip = rng.random() < 0.5
    n = int(rng.integers(4, 10)) if strip else int(rng.integers(6, 14))
    w, h = b.um(7, 10), b.um(16, 24)
    if strip:
        ang = rng.uniform(0, np.pi)
        bend = rng.normal(0, 0.04)
        xs = (np.arange(n) - (n - 1) / 2) * w * 0.95
        centres = rotate(np.stack([xs, bend * xs ** 2 / max(w, 1)], 1), ang)
        angles = np.full(n, ang) + rng.normal(0, 0.06, n)
    else:
        sd = b.um(7, 12)
        centres = rng.normal(0, sd, (n, 2))
        angles = np.arctan2(centres[:, 1], centres[:, 0]) - np.pi / 2 + rng.normal(0, 0.35, n)
    ext = np.abs(centres).max(0) + h * 0.7
    p = Patch(*ext)
    union, nuclei = np.zeros(p.shape, np.float32), []
    for c, a in zip(centres, angles):
        cw, ch = w * rng.uniform(0.85, 1.1) / 2, h * rng.uniform(0.85, 1.1) / 2
        out = contour(rng, cw, ch, a, 0.04)
        union = np.maximum(union, cytoplasm(p, b, out, folds=0.0, at=c))
        off = rotate(np.array([[0.0, ch * rng.uniform(0.35, 0.5)]]), a)[0]  # basal, eccentric
        r = b.um(3.6, 5.2)
        nucleus(p, b, r * 0.75, r, rng.uniform(0.85, 1.15), "granular", 0.06, angle=a, at=c + off,
                nucleolus=0.5)
        nuclei.append(c + off)
    return p.sprite(union, nuclei, centres)
