"""Every labelled class drawer (parametrized over the registry): sizes at 1 µm/px, nuclei, the size cap,
and the field's truth bookkeeping."""
from __future__ import annotations

import numpy as np
import pytest

from cyto_edge.runtime.taxonomy import DEFAULT_CLASSES
from cyto_edge.synth import cells
from cyto_edge.synth.field import DRAWERS, Canvas, plan_field, render_field
from cyto_edge.synth.stain import Stain

# longer box side in px at 1 µm/px: (min, max) over many draws, from the class descriptions
SIZE_PX = {"ascus": (28, 60), "asch": (14, 30), "lsil": (30, 64), "hsil": (14, 70), "scc": (30, 160),
           "agc": (20, 160), "trichomonas": (14, 34), "candida": (40, 160), "flora": (28, 64),
           "herps": (25, 60), "actinomyces": (35, 130)}
NUCLEI = {"ascus": (1, 1), "asch": (1, 1), "lsil": (1, 2), "hsil": (1, 4), "scc": (1, 1), "agc": (4, 13),
          "trichomonas": (1, 1), "candida": (0, 0), "flora": (1, 1), "herps": (2, 8), "actinomyces": (0, 0)}


def test_registry_covers_the_taxonomy():
    assert set(DRAWERS) == set(DEFAULT_CLASSES) == set(SIZE_PX)


@pytest.mark.parametrize("cls", DEFAULT_CLASSES)
def test_drawer_sizes_and_nuclei(cls):
    rng = np.random.default_rng(7)
    canvas = Canvas(rng, 64, 64, 1.0, Stain.sample(rng))
    lo, hi = SIZE_PX[cls]
    for _ in range(25):
        s = canvas._draw_fitting(cls, 160)
        h, w = s.od.shape[:2]
        assert 0 <= s.box[0] < s.box[2] <= w and 0 <= s.box[1] < s.box[3] <= h
        assert lo <= s.size <= hi, (cls, s.size)
        assert NUCLEI[cls][0] <= len(s.nuclei) <= NUCLEI[cls][1]
        assert s.od.dtype == np.float32 and s.od.min() >= 0 and s.od.max() > 0.05


def test_normal_squames_are_35_to_60_um_with_small_nuclei():
    rng = np.random.default_rng(1)
    b = Canvas(rng, 64, 64, 1.0, Stain.sample(rng)).brush
    sizes = [cells.squamous(b).size for _ in range(60)]
    assert 32 <= min(sizes) and max(sizes) <= 62 and np.median(sizes) > 40


def test_objects_shrink_to_fit_at_high_magnification():
    rng = np.random.default_rng(3)
    canvas = Canvas(rng, 64, 64, 1 / 0.5, Stain.sample(rng))  # 0.5 µm/px: everything twice as many px
    for cls in ("candida", "actinomyces", "scc"):
        assert all(canvas._draw_fitting(cls, 160).size <= 160 for _ in range(8))


def test_field_truth_counts_what_was_drawn():
    rng = np.random.default_rng(5)
    plan = plan_field(rng, 0.26, classes=["herps", "agc"], kind="lesion")
    f = render_field(rng, 512, 512, 1.0, plan)
    assert f.image.shape == (512, 512, 3) and f.image.dtype == np.uint8
    assert set(f.labels) == {"herps", "agc"} and f.truth["fov_grade"] == "AGC" and f.truth["organisms"] == ["herps"]
    assert f.truth["nuclei"]["labelled"] >= 2 + 4 and f.truth["squamous_count"] > 0
    empty = render_field(rng, 256, 256, 1.0, plan_field(rng, 0.07, kind="empty"))
    assert empty.truth["empty"] and empty.truth["nuclei_count"] == 0 and len(empty.boxes) == 0
    assert float(empty.image.std()) < 12  # background, a little debris, noise
