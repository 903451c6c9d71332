"""Fixtures of the pipeline tests: a deterministic blob detector behind the Engine contract, real frames.

`BlobEngine` stands in for a trained detector where a test needs to know exactly what must be found
(the tiny fixture model is trained too briefly to find anything reliably): it reads the normalized tiles
it is given, finds black blobs (R and G below 20), and writes SSD outputs that the one decoder decodes back
to their boxes: the blob's box encoded against its best prior of the bundle, class = round(blue / 20),
score ~0.9995. A blob cut by the tile's border is reported with its cut box, as a real detector would.
Everything else (tiling, normalization, decoding, merging, grading) is the real code.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from cyto_edge.runtime.boxes import iou as box_iou
from cyto_edge.runtime.bundle import Bundle
from cyto_edge.runtime.decode import encode_boxes


class BlobEngine:
    name = "blob"
    precision = "fp32"

    def __init__(self, bundle: Bundle, fail_after: int | None = None):
        m = bundle.manifest
        self.priors, self.variances = bundle.priors(), m.output.variances
        self.S = m.input.size[0]
        self.C = len(m.classes)
        self.mean, self.std, self.scale = np.asarray(m.input.mean), np.asarray(m.input.std), m.input.scale
        p = self.priors * self.S                                                    # (P, 4) cx cy w h px
        self.prior_xyxy = np.stack([p[:, 0] - p[:, 2] / 2, p[:, 1] - p[:, 3] / 2,
                                    p[:, 0] + p[:, 2] / 2, p[:, 1] + p[:, 3] / 2], 1).astype(np.float32)
        self.calls, self.fail_after = 0, fail_after

    def infer(self, x: np.ndarray):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("device lost")
        N, P = x.shape[0], len(self.priors)
        loc = np.zeros((N, P, 4), np.float32)
        logits = np.zeros((N, P, self.C + 1), np.float32)
        logits[..., 0] = 10.0
        for n in range(N):
            rgb = (x[n].transpose(1, 2, 0) * self.std + self.mean) / self.scale          # (S, S, 3) 0-255
            mask = ((rgb[..., 0] < 20) & (rgb[..., 1] < 20)).astype(np.uint8)
            k, lab, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            for i in range(1, k):
                x0, y0, w, h, area = stats[i]
                if area < 30:
                    continue
                box = np.array([[x0, y0, x0 + w, y0 + h]], np.float32)
                j = int(np.argmax(box_iou(box, self.prior_xyxy)[0]))
                cls = int(np.clip(round(float(np.median(rgb[..., 2][lab == i])) / 20), 0, self.C - 1))
                loc[n, j] = encode_boxes(box[0], self.priors[j], self.variances, (self.S, self.S))
                logits[n, j, 0], logits[n, j, 1 + cls] = 0.0, 10.0
        return loc, logits

    def close(self):
        pass


def draw_cell(frame: np.ndarray, box, cls: int) -> None:
    """A black square cell (BGR: blue = 20 x class) at box xyxy frame px."""
    x1, y1, x2, y2 = (int(v) for v in box)
    frame[y1:y2, x1:x2] = (20 * cls, 0, 0)


@pytest.fixture(scope="session")
def tiny(tiny_bundle) -> Bundle:
    return Bundle.open(tiny_bundle)


@pytest.fixture
def writable_bundle(tiny_bundle, tmp_path) -> Path:
    """A writable copy of the tiny bundle."""
    dst = tmp_path / "copy.cytobundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture(scope="session")
def real_frame(synth_small):
    """A factory: a synthetic field (BGR) resized to (w, h); no black pixels of its own."""
    path = sorted((synth_small / "test").glob("*.jpg"))[0]
    base = cv2.imread(str(path))

    def make(w: int, h: int) -> np.ndarray:
        img = cv2.resize(base, (w, h), interpolation=cv2.INTER_LINEAR)
        return np.maximum(img, 30).astype(np.uint8)      # keep the blob detector's black for drawn cells

    return make


@pytest.fixture(scope="session")
def blob_engine():
    """The BlobEngine class (instantiate with a Bundle)."""
    return BlobEngine


@pytest.fixture(scope="session")
def draw():
    """draw_cell(frame, box, cls)."""
    return draw_cell
