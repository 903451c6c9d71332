"""Nuclei and squamous-cell counter for specimen adequacy: classical image processing, numpy + OpenCV.

Sizes are physical (µm, µm²); `um_per_px` is the camera's scale. Steps, per field of view (BGR uint8,
uint16 or float; grayscale and BGRA accepted):
1. Optical density per channel, OD = -ln(I / white), `white` the bright background (a high percentile).
2. A hematoxylin-like channel: min(OD_green, OD_red). Hematoxylin (blue-purple nuclei) absorbs both red
   and green; the Papanicolaou cytoplasm dyes mostly absorb one of them (light green: red; eosin and
   orange G: green and blue), so a single layer of cytoplasm stays low in this channel.
3. Background: a grey opening wider than a normal nucleus (`background_um`) removes sheets of
   overlapping cytoplasm and keeps compact dark blobs; light Gaussian smoothing first.
4. Threshold: `peak_fraction` x the typical (75th percentile) blob peak of the field, clamped to
   [min_contrast, max_contrast] OD, so that stain intensity and focus blur move the cut with them.
5. Touching nuclei: the maxima of a blob's distance transform (>= `peak_sep_um` apart) are one nucleus
   when the waist between them is wider than `neck_ratio` x the lower maximum (a ridge, as in an elongated
   nucleus); otherwise the blob splits, each pixel going to its nearest maximum. A split leaving a part
   smaller than a nucleus is undone (lobed neutrophil nuclei). A non-convex blob with several maxima
   that is still larger than its parts explain (a clump of neutrophils) is counted by area: its area over
   the field's median single-nucleus area, split by k-means.
6. Size filter: nuclei between `min_area_um2` and `max_area_um2` are counted (`count_nuclei`).

Squamous cells (`count_squamous`, the adequacy count of TBS): nuclei of normal squamous size that sit in a
sheet of cytoplasm (the 25th percentile of the OD in a ring 6-11 µm from the centre, other nuclei left
out, >= `cytoplasm_od`) and are not crowded (at most `crowd_max` other nuclei within 12 µm): squamous cells
are 35-60 µm across, while inflammatory cells are small, pale-cytoplasm and clustered.
Frames finer than 0.5 µm/px are first resized to 0.5 µm/px (tiling.rescale, as the detector's frames; a BGR
uint8 frame is resampled as it is, so that step 1 works from its 256-entry table).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.runtime.tiling import rescale


@dataclass(frozen=True)
class NucleiParams:
    min_area_um2: float = 13.0          # smaller blobs: debris specks, neutrophil lobes, noise
    max_area_um2: float = 800.0         # larger blobs: clumps, stain deposits
    squamous_area_um2: tuple[float, float] = (11.0, 70.0)  # normal squamous nuclei (count_squamous)
    background_um: float = 16.0         # opening diameter for the background estimate
    smooth_um: float = 0.5              # Gaussian sigma
    min_contrast: float = 0.15          # OD bounds of the threshold
    max_contrast: float = 0.6
    peak_fraction: float = 0.35         # threshold = this x the typical nucleus peak of the field
    peak_percentile: float = 75.0
    cluster_solidity: float = 0.85      # below: a clump of nuclei, counted by area when under-split
    typical_area_um2: float = 35.0      # single-nucleus area when a field has too few to measure it
    cytoplasm_od: float = 0.25          # squamous: cytoplasm OD (sum of channels) around the nucleus
    crowd_max: int = 2                  # squamous: other nuclei allowed within 12 µm
    neck_ratio: float = 0.85            # waist / peak above which two maxima are one nucleus
    peak_sep_um: float = 2.5
    work_um_per_px: float = 0.5         # finest working scale


@dataclass
class Nuclei:
    centres: np.ndarray    # (N, 2) float32 xy in input-image pixels
    areas_um2: np.ndarray  # (N,) float32, one per nucleus counted
    threshold: float       # OD threshold used
    squamous: np.ndarray | None = None  # (N,) bool: a normal squamous cell's nucleus (see count_squamous)

    def __len__(self) -> int:
        return len(self.areas_um2)


def _as_bgr_float(image: np.ndarray) -> np.ndarray:
    """uint8 / uint16 / float, gray / BGR / BGRA -> (H, W, 3) float32 in 0..255."""
    a = np.asarray(image)
    if a.size == 0 or a.ndim not in (2, 3):
        raise BadInput(f"nuclei counter: expected an (H, W) or (H, W, 3) image, got shape {a.shape}")
    if a.ndim == 3 and a.shape[2] not in (1, 3, 4):
        raise BadInput(f"nuclei counter: {a.shape[2]} channels; expected gray, BGR or BGRA")
    if a.dtype == np.uint16:
        a = a.astype(np.float32) / 257.0
    elif a.dtype != np.uint8:
        a = a.astype(np.float32)
        a = a * 255.0 if a.max() <= 1.0 else a
    a = a.astype(np.float32)
    if a.ndim == 2 or a.shape[2] == 1:
        a = np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=2)
    return a[..., :3]


def _od(values: np.ndarray, white: np.ndarray) -> np.ndarray:
    return np.maximum(-np.log(np.clip(values, 1.0, None) / white), 0).astype(np.float32)


def _percentile_u8(hist: np.ndarray, q: float) -> float:
    """np.percentile(values, q) (its default, linear interpolation) of uint8 values given by their histogram."""
    n = int(hist.sum())
    pos = q / 100.0 * (n - 1)
    lo = int(np.floor(pos))
    cum = np.cumsum(hist)
    v_lo = int(np.searchsorted(cum, lo + 1))          # the value of order statistic lo (0-based)
    v_hi = int(np.searchsorted(cum, min(lo + 1, n - 1) + 1))
    return v_lo + (pos - lo) * (v_hi - v_lo)


def optical_density(image: np.ndarray) -> np.ndarray:
    """Image -> (H, W, 3) float32 OD per BGR channel against the bright background (step 1)."""
    a = np.asarray(image)
    bgr8 = a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and a.size > 0
    if not bgr8:
        img = _as_bgr_float(a)
        white = np.maximum(np.percentile(img.reshape(-1, 3)[::7], 99.5, axis=0), 1.0).astype(np.float32)
        return _od(img, white)
    # np.percentile's value (linear between order statistics), from a histogram per channel; then a
    # 256-entry table per channel: the same float32 arithmetic, once per grey level
    sample = a.reshape(-1, 3)[::7]
    white = np.maximum([_percentile_u8(np.bincount(sample[:, c], minlength=256), 99.5) for c in range(3)], 1.0)
    lut = _od(np.arange(256, dtype=np.float32)[:, None], white.astype(np.float32))          # (256, 3)
    return cv2.LUT(np.ascontiguousarray(a), lut.reshape(1, 256, 3))


def nuclear_density(od: np.ndarray, um_per_px: float, p: NucleiParams = NucleiParams()) -> np.ndarray:
    """(H, W, 3) OD -> (H, W) float32 hematoxylin-like OD with the cytoplasm background removed (steps 2-3)."""
    h = np.maximum(np.minimum(od[..., 1], od[..., 2]), 0, dtype=np.float32)
    s = max(p.smooth_um / um_per_px, 0.4)
    h = cv2.GaussianBlur(h, (0, 0), s)
    d = int(round(p.background_um / um_per_px)) | 1
    # opening = erosion then dilation with a rectangle (separable, fast); then smoothed to avoid blockiness
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (d, d))
    bg = cv2.morphologyEx(h, cv2.MORPH_OPEN, k)
    bg = cv2.blur(bg, (d, d))
    return np.clip(h - np.minimum(bg, h), 0, None)


def _field_threshold(dens: np.ndarray, p: NucleiParams, um_per_px: float) -> float:
    """OD cut: a fraction of the typical nucleus peak contrast of this field, within [min, max]_contrast."""
    n, lab = cv2.connectedComponents((dens >= p.min_contrast).astype(np.uint8), connectivity=8)
    if n <= 1:
        return p.max_contrast
    on = lab > 0                                   # areas and peaks from the blobs' pixels only
    blob = lab[on]
    area = np.bincount(blob, minlength=n)[1:]
    peak = np.zeros(n, np.float32)
    np.maximum.at(peak, blob, dens[on])
    peak = peak[1:][area >= p.min_area_um2 / um_per_px ** 2]
    if len(peak) == 0:
        return p.max_contrast
    return float(np.clip(p.peak_fraction * np.percentile(peak, p.peak_percentile), p.min_contrast, p.max_contrast))


def _peaks(dist: np.ndarray, sep_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Maxima of a distance transform at least `sep_px` apart -> (centres xy (M, 2) float64, heights (M,))."""
    r = max(int(round(sep_px)), 1)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2)
    peaks = (dist >= cv2.dilate(dist, k) - 1e-3) & (dist >= 1.0)
    n, lab, _, centroids = cv2.connectedComponentsWithStats(peaks.astype(np.uint8), connectivity=8)
    height = np.zeros(n, np.float32)
    on = lab > 0
    np.maximum.at(height, lab[on], dist[on])
    return centroids[1:], height[1:].astype(np.float64)


def _necks(dist: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(M, M) smallest distance-transform value on each segment between two peaks (xy): the width of the
    waist between them. Each segment is sampled at ceil(length) + 2 evenly spaced points."""
    m = len(centres)
    i, j = np.triu_indices(m, 1)
    a, d = centres[i], centres[j] - centres[i]                                          # (P, 2)
    n = np.ceil(np.sqrt((d ** 2).sum(1))).astype(int) + 2                               # samples per segment
    seg = np.repeat(np.arange(len(i)), n)
    start = np.cumsum(n) - n
    step = np.arange(n.sum()) - start[seg]                                              # 0..n-1 per segment
    t = step * (1.0 / (n - 1))[seg]                                                     # as np.linspace
    t[start + n - 1] = 1.0
    xy = np.round(a[seg] + t[:, None] * d[seg]).astype(int)
    v = dist[xy[:, 1], xy[:, 0]]
    low = np.minimum.reduceat(v, start)
    out = np.full((m, m), np.inf)
    out[i, j] = out[j, i] = low
    return out


def _split(comp: np.ndarray, min_px: float, sep_px: float, neck_ratio: float) -> tuple[list, int]:
    """Binary component crop (h, w) uint8 -> ([(pixels, centre xy (2,))] of its nuclei, number of maxima).

    Peaks joined by a waist wider than `neck_ratio` x the lower peak belong to one nucleus (an elongated
    or irregular nucleus has a ridge, not a waist); the others split the component, pixels going to the
    nearest peak. A split that leaves a part smaller than a nucleus is undone.
    """
    ys, xs = np.nonzero(comp)
    total = [(len(xs), np.array([xs.mean(), ys.mean()]))]
    if len(xs) < 2 * min_px:
        return total, 1                               # too small to hold two nuclei
    dist = cv2.distanceTransform(cv2.copyMakeBorder(comp, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0),
                                 cv2.DIST_L2, 3)[1:-1, 1:-1]
    centres, height = _peaks(dist, sep_px)
    m = len(centres)
    if m < 2:
        return total, m
    joined = _necks(dist, centres) >= neck_ratio * np.minimum(height[:, None], height[None, :])
    group = list(range(m))                            # union-find over peaks
    def find(i):
        while group[i] != i:
            i = group[i]
        return i
    for i, j in zip(*np.nonzero(np.triu(joined, 1))):
        group[find(i)] = find(j)
    roots = sorted({find(i) for i in range(m)})
    if len(roots) < 2:
        return total, m
    near = np.argmin(((np.stack([xs, ys], 1)[:, None, :] - centres[None]) ** 2).sum(-1), 1)
    owner = np.array([roots.index(find(i)) for i in range(m)])[near]
    parts = np.bincount(owner, minlength=len(roots))
    if parts.min() < min_px:
        return total, m
    return [(int(parts[g]), np.array([xs[owner == g].mean(), ys[owner == g].mean()])) for g in range(len(roots))], m


def _solidity(comp: np.ndarray) -> float:
    """Pixel area over the area of the convex hull of the pixel squares (1 for a convex blob)."""
    ys, xs = np.nonzero(comp)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(np.float32)
    return float(len(xs)) / max(cv2.contourArea(cv2.convexHull(corners)), 1.0)


def _kmeans_parts(comp: np.ndarray, k: int, iters: int = 6) -> list[tuple[int, np.ndarray]]:
    """Split a clump's pixels into k compact parts (farthest-point start, Lloyd iterations)."""
    ys, xs = np.nonzero(comp)
    pts = np.stack([xs, ys], 1).astype(np.float64)                                        # (N, 2)
    c = [pts.mean(0)]
    d2 = ((pts - c[0]) ** 2).sum(1)
    for _ in range(k - 1):
        c.append(pts[np.argmax(d2)])
        d2 = np.minimum(d2, ((pts - c[-1]) ** 2).sum(1))
    c = np.array(c)                                                                        # (k, 2)
    for _ in range(iters):
        own = np.argmin(((pts[:, None] - c[None]) ** 2).sum(-1), 1)                       # (N,)
        n = np.bincount(own, minlength=k)
        sums = np.stack([np.bincount(own, pts[:, j], minlength=k) for j in (0, 1)], 1)
        c = np.where(n[:, None] > 0, sums / np.maximum(n, 1)[:, None], c)
    own = np.argmin(((pts[:, None] - c[None]) ** 2).sum(-1), 1)
    n = np.bincount(own, minlength=k)
    return [(int(n[g]), c[g]) for g in range(k) if n[g]]


def _blobs(mask: np.ndarray, min_px: float, max_px: float):
    """Connected components of a mask worth looking at -> [(x0, y0, crop (h, w) uint8, pixel count)]."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    out = []
    for i in np.nonzero((stats[1:, 4] >= min_px) & (stats[1:, 4] <= 4 * max_px))[0] + 1:
        x, y, w, h, a = stats[i]
        out.append((x, y, (lab[y:y + h, x:x + w] == i).astype(np.uint8), int(a)))
    return out


def segment_nuclei(image: np.ndarray, um_per_px: float, params: NucleiParams | None = None) -> Nuclei:
    """Nuclei of a field of view: centres (input px) and areas (µm²); see the module docstring."""
    p = params or NucleiParams()
    if not um_per_px or um_per_px <= 0:
        raise BadInput(f"nuclei counter: um_per_px must be > 0, got {um_per_px}")
    img, scale = np.asarray(image), 1.0
    if um_per_px < p.work_um_per_px:
        scale = um_per_px / p.work_um_per_px
        if not (img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
            img = _as_bgr_float(img)     # a BGR uint8 frame is resampled as it is (and keeps the OD table)
        img = rescale(img, scale)        # as the detector's frames: k x k area means, then bilinear
        um_per_px = p.work_um_per_px
    od = optical_density(img)                                                              # (H, W, 3)
    dens = nuclear_density(od, um_per_px, p)                                               # (H, W)
    thr = _field_threshold(dens, p, um_per_px)
    mask = cv2.morphologyEx((dens >= thr).astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    px_area = um_per_px ** 2
    min_px, max_px = p.min_area_um2 / px_area, p.max_area_um2 / px_area
    blobs = [(x, y, comp, area, *_split(comp, min_px, p.peak_sep_um / um_per_px, p.neck_ratio))
             for x, y, comp, area in _blobs(mask, min_px, max_px)]
    singles = [parts[0][0] for *_, parts, npk in blobs if npk <= 1]
    typical = float(np.median(singles)) if len(singles) >= 10 else p.typical_area_um2 / px_area
    areas: list[float] = []
    centres: list[np.ndarray] = []
    for x, y, comp, area, parts, npk in blobs:
        k = int(round(area / typical))
        if npk >= 2 and k > len(parts) and _solidity(comp) < p.cluster_solidity:
            parts = _kmeans_parts(comp, k)    # a clump the waists did not split: count it by area
        for q, c in parts:
            if min_px <= q <= max_px:
                areas.append(q * px_area)
                centres.append((c + (x, y)) / scale)
    xy = np.asarray(centres, np.float32).reshape(-1, 2) * scale                          # working px
    sq = _squamous(od[..., 0] + od[..., 1] + od[..., 2], cv2.dilate(mask, np.ones((3, 3), np.uint8)), xy, um_per_px, p)
    return Nuclei(xy / scale, np.asarray(areas, np.float32), thr, sq)


def _squamous(od: np.ndarray, nuc_mask: np.ndarray, xy: np.ndarray, um_per_px: float, p: NucleiParams) -> np.ndarray:
    """(H, W) total OD, nuclei mask, (N, 2) centres px -> (N,) bool: nucleus inside a cytoplasm sheet, not crowded."""
    if len(xy) == 0:
        return np.zeros(0, bool)
    R = int(np.ceil(11.0 / um_per_px))
    dy, dx = np.mgrid[-R:R + 1, -R:R + 1]
    rr = np.hypot(dx, dy) * um_per_px
    dx, dy = dx[(rr >= 6) & (rr <= 11)], dy[(rr >= 6) & (rr <= 11)]                       # (P,) ring offsets
    H, W = od.shape
    xs = np.clip(np.round(xy[:, :1]).astype(int) + dx[None], 0, W - 1)                   # (N, P)
    ys = np.clip(np.round(xy[:, 1:]).astype(int) + dy[None], 0, H - 1)
    free = nuc_mask[ys, xs] == 0                                                           # (N, P)
    ring = np.sort(np.where(free, od[ys, xs], np.inf), axis=1)
    n = free.sum(1)
    cyto = np.where(n > 0, ring[np.arange(len(xy)), ((n - 1) * 0.25).astype(int)], 0.0)   # 25th percentile
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2) * um_per_px                        # (N, N) µm
    crowd = (d < 12.0).sum(1) - 1
    return (cyto >= p.cytoplasm_od) & (crowd <= p.crowd_max)


def count_nuclei(image_bgr: np.ndarray, um_per_px: float, params: NucleiParams | None = None) -> int:
    """Number of nuclei in a field of view (all sizes between min_area_um2 and max_area_um2)."""
    return len(segment_nuclei(image_bgr, um_per_px, params))


def count_squamous(image_bgr: np.ndarray, um_per_px: float, params: NucleiParams | None = None) -> int:
    """Number of normal squamous cells (their nuclei, in cytoplasm, of normal size): the adequacy count (TBS)."""
    p = params or NucleiParams()
    n = segment_nuclei(image_bgr, um_per_px, p)
    lo, hi = p.squamous_area_um2
    return int(np.count_nonzero(n.squamous & (n.areas_um2 >= lo) & (n.areas_um2 <= hi)))
