"""The picture of synthetic samples in the README: two fields and crops of every class, boxes drawn.

    python -m cyto_edge.synth.grid docs/synth_grid.png [--seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from cyto_edge.runtime.taxonomy import DEFAULT_CLASSES
from cyto_edge.synth.crops import labelled_crops
from cyto_edge.synth.field import plan_field, render_field

FIELDS = (("hsil", "lsil", "trichomonas", "ascus"), ("scc", "candida", "herps", "asch"))
BOX = (40, 40, 230)            # BGR red-ish
INK = (40, 40, 40)


def make_grid(out: str | Path, seed: int = 0, per_class: int = 4, crop_px: int = 100,
              field_px: int = 1024, show_px: int = 500) -> Path:
    """Write the PNG and return its path: fields on top (downscaled to show_px), class rows below.
    The two lowest bits of each channel are dropped (invisible; keeps the PNG near 1 MB)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6A1D]))
    tiles = []
    for classes in FIELDS:
        plan = plan_field(rng, (field_px / 1000.0) ** 2, classes=list(classes), kind="lesion")
        plan.focus = min(plan.focus, 0.1)
        f = render_field(rng, field_px, field_px, 1.0, plan)
        s = show_px / field_px
        img = cv2.resize(f.image, (show_px, show_px), interpolation=cv2.INTER_AREA)
        for b, c in zip(f.boxes * s, f.labels):
            _box(img, b, c, 0.42)
        tiles.append(img)
    top = np.concatenate([tiles[0], np.full((show_px, 8, 3), 255, np.uint8), tiles[1]], 1)
    crops = labelled_crops(per_class, seed, window=160, out=crop_px)
    rows = []
    half = (len(DEFAULT_CLASSES) + 1) // 2
    for block in (DEFAULT_CLASSES[:half], DEFAULT_CLASSES[half:]):
        rows.append(np.concatenate([_class_row(crops, c, per_class, crop_px) for c in block], 0))
    if rows[1].shape[0] < rows[0].shape[0]:
        pad = np.full((rows[0].shape[0] - rows[1].shape[0], rows[1].shape[1], 3), 255, np.uint8)
        rows[1] = np.concatenate([rows[1], pad], 0)
    bottom = np.concatenate([rows[0], np.full((rows[0].shape[0], 8, 3), 255, np.uint8), rows[1]], 1)
    width = max(top.shape[1], bottom.shape[1])
    canvas = np.full((top.shape[0] + bottom.shape[0] + 40, width, 3), 255, np.uint8)
    canvas[:top.shape[0], :top.shape[1]] = top
    canvas[top.shape[0] + 10:top.shape[0] + 10 + bottom.shape[0], :bottom.shape[1]] = bottom
    cv2.putText(canvas, "cyto-edge synth: synthetic Pap-smear fields (1 um/px) and 160 um crops per class. "
                "Research use only.", (6, canvas.shape[0] - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.45, INK, 1, cv2.LINE_AA)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), (canvas & 0xFC) | 2, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return out


def _class_row(crops, cls: str, n: int, px: int) -> np.ndarray:
    label = np.full((px, 100, 3), 255, np.uint8)
    cv2.putText(label, cls, (4, px // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, INK, 1, cv2.LINE_AA)
    idx = np.flatnonzero(crops.labels == crops.classes.index(cls))[:n]
    tiles = [label]
    for i in idx:
        img = crops.images[i].copy()
        _box(img, crops.boxes[i], None, 0.4)
        tiles += [img, np.full((px, 3, 3), 255, np.uint8)]
    row = np.concatenate(tiles, 1)
    return np.concatenate([row, np.full((3, row.shape[1], 3), 255, np.uint8)], 0)


def _box(img: np.ndarray, b: np.ndarray, name: str | None, scale: float) -> None:
    x0, y0, x1, y1 = (int(round(v)) for v in b)
    cv2.rectangle(img, (x0, y0), (x1, y1), BOX, 1, cv2.LINE_AA)
    if name:
        cv2.putText(img, name, (x0, max(10, y0 - 3)), cv2.FONT_HERSHEY_SIMPLEX, scale, BOX, 1, cv2.LINE_AA)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="docs/synth_grid.png")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    p = make_grid(a.out, a.seed)
    print(f"{p} ({p.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":  # pragma: no cover
    main()
