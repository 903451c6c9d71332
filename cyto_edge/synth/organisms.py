"""Organisms and infection-related cell changes (flags under NILM): trichomonas, candida, flora (clue
cells), herps (herpes cytopathic effect) and actinomyces. Recognisable by shape, never by a colour of
their own: bodies, hyphae and actinomyces tangles take the shared cytoplasm stain, coccobacilli the
shared nuclear stain.
"""
from __future__ import annotations

import cv2
import numpy as np

from cyto_edge.synth.cells import Brush, cytoplasm, nucleus
from cyto_edge.synth.shapes import Patch, Sprite, contour, edge, polygon, rotate


def trichomonas(b: Brush) -> Sprite:
    """Pear-shaped protozoon 15-30 µm, pale granular body, small eccentric elongated nucleus."""
    rng = b.rng
    length = b.um(15, 30)
    a, w = length / 2, length / 2 * rng.uniform(0.55, 0.75)
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    k = rng.uniform(0.25, 0.4)  # pear: wider at the front (+x)
    pts = np.stack([a * np.cos(t), w * np.sin(t) * (1 + k * np.cos(t))], 1)
    pts *= 1 + rng.normal(0, 0.03, (40, 1))
    ang = rng.uniform(0, 2 * np.pi)
    out = rotate(pts, ang)
    flag = rng.random() < 0.4
    ext = np.abs(out).max(0) + (length * 0.8 if flag else 0)
    p = Patch(*ext)
    m = cytoplasm(p, b, out, smooth=0.1, rim=0.35, folds=0.0)
    grains = p.mask(out) * (b.tex.get("fine", *p.shape) > 1.6)
    p.paint(0.6 * grains, b.stain.cytoplasm(rng))
    at = rotate(np.array([[a * rng.uniform(0.2, 0.4), rng.normal(0, 0.1) * w]]), ang)[0]
    nucleus(p, b, b.um(2.0, 3.2), b.um(1.0, 1.5), rng.uniform(0.5, 0.85), "fine", 0.04, angle=ang, at=at)
    if flag:  # faint flagellum from the narrow end: drawn, not part of the box
        s = np.linspace(0, 1, 8)[:, None]
        tail = np.concatenate([-a - s * length * 0.7, np.sin(s * 5) * b.um(1.5)], 1)
        p.paint(0.5 * p.lines(rotate(tail, ang), 1.0), b.stain.cytoplasm(rng))
    return p.sprite(m, [at])


def candida(b: Brush) -> Sprite:
    """Pseudohyphae: chains of elongated segments pinched at the joints, branching, up to ~150 µm; spores."""
    rng = b.rng
    segs = []  # (centre (2,), angle, half-length, half-width)
    width = b.um(1.1, 1.8)

    def chain(start: np.ndarray, ang: float, total: float) -> None:
        pos, done = start.copy(), 0.0
        while done < total:
            half = b.um(4.5, 8)
            d = np.array([np.cos(ang), np.sin(ang)])
            segs.append((pos + d * half, ang, half, width * rng.uniform(0.85, 1.1)))
            pos = pos + d * 2 * half
            done += 2 * half
            ang += rng.normal(0, 0.2)

    chain(np.zeros(2), rng.uniform(0, 2 * np.pi), b.um(60, 145))
    for _ in range(int(rng.integers(0, 3))):  # branches from a joint of the main chain
        c, a, h, _w = segs[int(rng.integers(0, len(segs)))]
        chain(c + np.array([np.cos(a), np.sin(a)]) * h, a + rng.choice((-1, 1)) * rng.uniform(0.5, 1.1),
              b.um(15, 50))
    centres = np.array([s[0] for s in segs])
    spores = [centres[int(rng.integers(0, len(segs)))] + rng.normal(0, b.um(6), 2)
              for _ in range(int(rng.integers(0, 4)))]
    lo, hi = centres.min(0) - b.um(10), centres.max(0) + b.um(10)
    shift = (lo + hi) / 2
    p = Patch(*((hi - lo) / 2))
    m = np.zeros(p.shape, np.float32)
    for c, a, h, w in segs:
        m = np.maximum(m, p.mask(contour(rng, h * 1.02, w, a, 0.02, n=24), c - shift))
    for c in spores:
        r = b.um(1.8, 2.6)
        m = np.maximum(m, p.mask(contour(rng, r, r * 0.75, rng.uniform(0, np.pi), 0.02, n=16), c - shift))
    dens = m * (1.0 + 0.15 * b.tex.get("grain", *p.shape)) + 0.8 * edge(m, 1.0) * m
    p.paint(dens, b.stain.cytoplasm(rng))
    return p.sprite(m, [], [])


def flora(b: Brush) -> Sprite:
    """Clue cell: a squamous cell carpeted with coccobacilli that blur its border."""
    rng = b.rng
    rx = b.um(18, 28)
    ry = rx * rng.uniform(0.7, 1.0)
    out = polygon(rng, rx, ry, rng.uniform(0, np.pi), int(rng.integers(5, 9)))
    p = Patch(*(np.abs(out).max(0) + b.um(3)))
    m = cytoplasm(p, b, out, folds=0.1)
    at = rng.normal(0, 0.1, 2) * (rx, ry)
    r = b.um(3.0, 4.0)
    nucleus(p, b, r, r * rng.uniform(0.8, 1.0), rng.uniform(0.55, 0.85), "fine", 0.03, at=at)
    k = max(3, int(round(b.um(3.0))) | 1)
    shaggy = cv2.dilate(m, np.ones((k, k), np.uint8))
    cover = np.clip(m + 0.35 * (shaggy - m), 0, 1)
    bugs = (b.tex.get("fine", *p.shape) > rng.uniform(0.7, 1.1)).astype(np.float32) * cover
    p.paint(bugs * rng.uniform(0.5, 0.8), b.stain.nuclear(rng, 0.8))
    return p.sprite(m, [at])


def herps(b: Brush) -> Sprite:
    """Herpes effect: a multinucleated cell, nuclei moulded against each other, ground-glass chromatin
    with marginated rims (the three Ms)."""
    rng = b.rng
    n = int(rng.choice([2, 3, 4, 5, 6, 7, 8], p=(0.06, 0.2, 0.24, 0.2, 0.14, 0.1, 0.06)))
    r = b.um(4.2, 5.8)
    centres = _pack(rng, n, 1.45 * r)
    rx = max(np.abs(centres).max() + r * rng.uniform(2.0, 2.8), b.um(15))
    out = contour(rng, rx, rx * rng.uniform(0.78, 1.0), rng.uniform(0, np.pi), 0.1)
    p = Patch(*np.abs(out).max(0))
    m = cytoplasm(p, b, out, folds=0.0)
    yy, xx = np.mgrid[0:p.shape[0], 0:p.shape[1]].astype(np.float32)
    d = np.stack([np.hypot(xx - (c[0] + p.c[0]), yy - (c[1] + p.c[1])) for c in centres])  # (n, h, w)
    owner = d.argmin(0)
    second = np.partition(d, 1, axis=0)[1] if n > 1 else np.full(d.shape[1:], 1e9)
    gap = (second - d.min(0)) > 1.0  # a hairline between moulded neighbours
    darkness = rng.uniform(0.6, 0.85)
    for i, c in enumerate(centres):
        clip = ((owner == i) & gap).astype(np.float32)
        nucleus(p, b, r * rng.uniform(1.0, 1.15), r * rng.uniform(0.9, 1.05), darkness * rng.uniform(0.95, 1.05),
                "glass", 0.05, at=c, clip=clip)
    return p.sprite(m, list(centres))


def _pack(rng: np.random.Generator, n: int, dist: float) -> np.ndarray:
    """n points (n, 2) packed tightly (about `dist` apart), centred on 0."""
    pts = rng.normal(0, dist * 0.4, (n, 2))
    for _ in range(30):
        diff = pts[:, None] - pts[None]
        dd = np.hypot(diff[..., 0], diff[..., 1]) + np.eye(n) * 1e9
        push = np.clip(dist - dd, 0, None) / np.maximum(dd, 1e-6)
        pts += 0.5 * (diff * push[..., None]).sum(1) - 0.05 * pts
    return pts - pts.mean(0)


def actinomyces(b: Brush) -> Sprite:
    """A 'cotton ball': a dense core with tangled radiating filaments, 40-120 µm."""
    rng = b.rng
    radius = b.um(20, 55)
    p = Patch(radius * 1.15, radius * 1.15)
    core_r = radius * rng.uniform(0.18, 0.3)
    core = p.mask(contour(rng, core_r, core_r * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi), 0.2))
    lines = []
    for _ in range(int(rng.integers(60, 120))):
        a = rng.uniform(0, 2 * np.pi)
        pos = np.array([np.cos(a), np.sin(a)]) * core_r * rng.uniform(0.2, 0.9)
        steps = max(4, int(radius * rng.uniform(0.55, 1.0) / b.um(2.0)))
        turn = np.cumsum(rng.normal(0, 0.28, steps)) + a + rng.normal(0, 0.3)
        walk = pos + np.cumsum(np.stack([np.cos(turn), np.sin(turn)], 1) * b.um(2.0), 0)
        lines.append(np.round((walk + p.c) * 16).astype(np.int32))
    fil = np.zeros(p.shape, np.uint8)
    cv2.polylines(fil, lines, False, 255, 1, lineType=cv2.LINE_AA, shift=4)
    m = np.clip(fil.astype(np.float32) / 255.0 + core, 0, 1)
    dens = fil.astype(np.float32) / 255.0 * 0.75 + core * np.clip(1 + 0.5 * b.tex.get("grain", *p.shape), 0.3, None)
    p.paint(dens, b.stain.cytoplasm(rng) * rng.uniform(1.3, 2.0))  # a dense tangle takes more stain
    box_mask = cv2.GaussianBlur(m, (0, 0), 2.0)  # the tangle's extent, not single stray pixels
    return p.sprite(box_mask, [], [], thr=0.12)
