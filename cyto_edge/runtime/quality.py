"""Per-frame image quality: focus, exposure, empty field. Fast: works on downscaled copies.

- focus: variance of the Laplacian of the grey image at `focus_side` (content-dependent: compare it
  within one field, or use `focus_norm`, divided by the tissue fraction, across fields; `FocusHistory`
  gives it relative to the recent best);
- exposure: mean brightness and the fractions of clipped pixels (dark / saturated);
- empty field: the fraction of "tissue" pixels, stained (saturated colour) or darker than the bright
  background of a smear; a field with less than `empty_threshold` of them is empty. The default, 0.5%,
  is set low on purpose: an empty synthetic field measures 0.0 and the sparsest field with abnormal cells
  on the seed-0 stage (34 squamous cells, 8 labelled lesions, one of them SCC) measures 1.6%, which the
  earlier 2% skipped as empty. Skipping a field that holds a lesion costs far more than grading a blank one.

About 2 ms per 1280x960 frame on one core (benchmarks/ and the test suite's report give the figure).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class QualityConfig:
    focus_side: int = 640          # focus is measured on a copy with this longest side (px)
    small_side: int = 256          # exposure, tissue and motion on a copy with this longest side (px)
    clip_low: int = 5              # grey level at or below which a pixel is clipped dark (0-255)
    clip_high: int = 250           # grey level at or above which a pixel is saturated (0-255)
    max_clipped: float = 0.05      # exposure is bad above this fraction of clipped pixels
    dark_mean: float = 40.0        # ... or with a mean grey level outside [dark_mean, bright_mean]
    bright_mean: float = 245.0
    tissue_saturation: int = 40    # HSV saturation (0-255) above which a pixel is stained tissue
    tissue_darkness: float = 0.75  # value below this x the background brightness: tissue
    empty_threshold: float = 0.005  # tissue fraction below which the field is empty (see the module doc)


@dataclass
class FrameQuality:
    focus: float          # variance of the Laplacian (grey 0-255) at focus_side
    focus_norm: float     # focus / max(tissue, 0.05): comparable across fields of different density
    brightness: float     # mean grey level, 0-255
    clipped_low: float    # fraction of pixels <= clip_low
    clipped_high: float   # fraction of pixels >= clip_high
    background: float     # background brightness (95th percentile of HSV value), 0-255
    tissue: float         # fraction of tissue pixels, 0-1
    exposure_ok: bool
    empty: bool

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class Analysis:
    quality: FrameQuality
    small_gray: np.ndarray   # (h, w) uint8 grey at small_side, for motion estimation
    scale: float             # small_gray pixels per frame pixel


def _resize(img: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    h, w = img.shape[:2]
    f = side / max(h, w)
    if f >= 1.0:
        return img, 1.0
    size = (max(int(round(w * f)), 1), max(int(round(h * f)), 1))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA), size[0] / w


def focus_score(gray: np.ndarray) -> float:
    """Variance of the Laplacian of a grey uint8 image (sharpness; larger is sharper)."""
    _, sd = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_16S, ksize=3))
    return float(sd[0, 0] ** 2)


def exposure_stats(gray: np.ndarray, cfg: QualityConfig) -> tuple[float, float, float, bool]:
    """(mean, fraction clipped dark, fraction saturated, exposure ok) of a grey uint8 image."""
    n = gray.size
    mean = float(cv2.mean(gray)[0])
    low = float(np.count_nonzero(gray <= cfg.clip_low)) / n
    high = float(np.count_nonzero(gray >= cfg.clip_high)) / n
    ok = low + high <= cfg.max_clipped and cfg.dark_mean <= mean <= cfg.bright_mean
    return mean, low, high, ok


def tissue_fraction(small_bgr: np.ndarray, cfg: QualityConfig) -> tuple[float, float]:
    """(fraction of tissue pixels, background brightness) of a small BGR image."""
    hsv = cv2.cvtColor(small_bgr, cv2.COLOR_BGR2HSV)
    s, v = hsv[:, :, 1], hsv[:, :, 2]
    hist = np.bincount(v.ravel(), minlength=256).cumsum()
    background = float(np.searchsorted(hist, 0.95 * hist[-1]))  # 95th percentile of V
    tissue = (s > cfg.tissue_saturation) | (v < cfg.tissue_darkness * background)
    return float(np.count_nonzero(tissue)) / tissue.size, background


def analyze(image: np.ndarray, cfg: QualityConfig | None = None) -> Analysis:
    """Quality of one (H, W, 3) uint8 BGR frame, and its small grey copy for motion estimation."""
    cfg = cfg or QualityConfig()
    mid, _ = _resize(image, cfg.focus_side)
    focus = focus_score(cv2.cvtColor(mid, cv2.COLOR_BGR2GRAY))
    small, _ = _resize(mid, cfg.small_side)
    scale = small.shape[1] / image.shape[1]
    gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    mean, low, high, ok = exposure_stats(gray, cfg)
    tissue, background = tissue_fraction(small, cfg)
    q = FrameQuality(focus=focus, focus_norm=focus / max(tissue, 0.05), brightness=mean, clipped_low=low,
                     clipped_high=high, background=background, tissue=tissue, exposure_ok=ok,
                     empty=tissue < cfg.empty_threshold)
    return Analysis(quality=q, small_gray=gray, scale=scale)


def frame_quality(image: np.ndarray, cfg: QualityConfig | None = None) -> FrameQuality:
    return analyze(image, cfg).quality


class FocusHistory:
    """Focus relative to the best of a rolling window of recent frames (a running max over `window`)."""

    def __init__(self, window: int = 300):
        self._q: collections.deque = collections.deque()  # (index, value), values decreasing
        self._i = 0
        self.window = int(window)

    def add(self, value: float) -> None:
        while self._q and self._q[-1][1] <= value:
            self._q.pop()
        self._q.append((self._i, float(value)))
        self._i += 1
        while self._q[0][0] <= self._i - 1 - self.window:
            self._q.popleft()

    @property
    def best(self) -> float:
        return self._q[0][1] if self._q else 0.0

    def relative(self, value: float) -> float:
        """value / recent best (1.0 when there is no history yet)."""
        b = self.best
        return float(value) / b if b > 0 else 1.0
