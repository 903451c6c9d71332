"""Quality measures on generated fields: focus falls with blur, clipped exposure is flagged, an empty field
is told from a sparse one; FocusHistory is a rolling best."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cyto_edge.runtime.quality import FocusHistory, QualityConfig, analyze, focus_score, frame_quality


def field(n_cells: int, size=(1280, 960), seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 BGR: `n_cells` stained cells with nuclei on a bright, slightly uneven background."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    vignette = 1.0 - 0.08 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2) * 4
    img = np.empty((h, w, 3), np.float32)
    img[:] = (232, 228, 236)
    img *= vignette[..., None]
    for _ in range(n_cells):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        axes = tuple(int(a) for a in rng.uniform(25, 60, 2))
        cv2.ellipse(img, (int(x), int(y)), axes, rng.uniform(0, 180), 0, 360,
                    (rng.uniform(150, 220), rng.uniform(110, 180), rng.uniform(170, 230)), -1, cv2.LINE_AA)
        cv2.circle(img, (int(x), int(y)), int(rng.uniform(6, 12)), (110, 60, 90), -1, cv2.LINE_AA)
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dense() -> np.ndarray:
    return field(250)


def test_focus_falls_monotonically_with_blur(dense):
    scores = [frame_quality(dense if s == 0 else cv2.GaussianBlur(dense, (0, 0), s)).focus
              for s in (0, 1, 2, 3, 5)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] > 5 * scores[2]
    assert focus_score(np.full((50, 50), 128, np.uint8)) == 0.0


def test_tissue_normalised_focus_compares_sparse_and_dense_fields(dense):
    sparse = field(25, seed=3)
    qd, qs = frame_quality(dense), frame_quality(sparse)
    assert qs.focus < 0.5 * qd.focus                       # raw focus depends on how much is in view ...
    assert qs.focus_norm > 0.5 * qd.focus_norm             # ... the normalised one much less
    blurred = frame_quality(cv2.GaussianBlur(sparse, (0, 0), 3))
    assert blurred.focus_norm < 0.2 * qd.focus_norm        # while blur still shows


def test_empty_sparse_and_dense_fields(dense):
    empty = frame_quality(field(0, seed=1))
    sparse = frame_quality(field(12, seed=2))
    full = frame_quality(dense)
    assert empty.empty and empty.tissue < 0.005
    assert not sparse.empty and 0.02 < sparse.tissue < 0.2
    assert not full.empty and full.tissue > 0.4
    assert 200 < empty.background <= 240
    # a dimmer lamp is still an empty field: tissue is relative to the background
    dim = frame_quality((field(0, seed=1) * 0.6).astype(np.uint8))
    assert dim.empty


def test_a_field_of_a_few_cells_is_not_empty():
    """Three cells cover about 1% of the frame: a sparse field still holds cells that may be lesions, so the
    default threshold grades it (a 2% threshold called such fields empty and skipped them)."""
    few = frame_quality(field(3, seed=4))
    assert 0.005 < few.tissue < 0.02, few.tissue
    assert not few.empty
    assert frame_quality(field(3, seed=4), QualityConfig(empty_threshold=0.02)).empty


def test_exposure_checks(dense):
    ok = frame_quality(dense)
    assert ok.exposure_ok and ok.clipped_high < 0.01
    over = frame_quality(cv2.convertScaleAbs(dense, alpha=1.6))
    assert not over.exposure_ok and over.clipped_high > 0.3
    dark = frame_quality((dense * 0.1).astype(np.uint8))
    assert not dark.exposure_ok and dark.brightness < 40


def test_analysis_downscales_and_reports_scale(dense):
    a = analyze(dense, QualityConfig(small_side=256))
    assert a.small_gray.shape == (192, 256) and a.small_gray.dtype == np.uint8
    assert a.scale == pytest.approx(0.2)
    small = analyze(dense[:100, :120])                    # smaller than the working sizes: no upscaling
    assert small.small_gray.shape == (100, 120) and small.scale == 1.0
    assert set(a.quality.to_dict()) >= {"focus", "tissue", "empty", "exposure_ok"}


def test_focus_history_is_a_rolling_best():
    h = FocusHistory(window=3)
    assert h.relative(5.0) == 1.0                         # no history yet
    for v in (10.0, 4.0, 6.0):
        h.add(v)
    assert h.best == 10.0 and h.relative(5.0) == 0.5
    h.add(2.0)                                            # 10 leaves the window
    assert h.best == 6.0
    h.add(1.0)
    h.add(1.0)
    assert h.best == 2.0                                  # window: 2, 1, 1
    h.add(1.0)
    assert h.best == 1.0
