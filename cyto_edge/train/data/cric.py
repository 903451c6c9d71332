"""CRIC Cervix-style nucleus points: `classifications.csv` with one row per cell (image_filename or
image, cell_id, bethesda_system, nucleus_x, nucleus_y) -> square boxes of a configured side centred on
each nucleus, clipped to the image. Bethesda names map to classes through the label map (built in:
ASC-US -> ascus, ASC-H -> asch, LSIL, HSIL, SCC; "Negative for intraepithelial lesion" is not a class
and is skipped). Every cell of a CRIC image is annotated, so an image with only negative cells is a
boxed image with no boxes.
"""
from __future__ import annotations

import math
from pathlib import Path

from cyto_edge.errors import BadInput
from cyto_edge.train.data.common import BoxCollector, column, read_csv_rows
from cyto_edge.train.data.imageinfo import IMAGE_EXTS, image_size
from cyto_edge.train.data.labels import IGNORED, LabelMap
from cyto_edge.train.data.types import ImageRecord

#: Side of the box around a nucleus when nothing else is said: CRIC's own cell crops are 100x100 px.
DEFAULT_POINT_BOX_PX = 100.0


def point_box_px(point_box_px: float | None, point_box_um: float | None, um_per_px: float | None) -> float:
    """The box side in pixels from a side in px or in µm (which needs the images' µm per pixel)."""
    if point_box_um is not None:
        if um_per_px is None:
            raise BadInput("a point-box side in µm needs the images' scale: give --um-per-px "
                           "(or a side in px, e.g. --point-box 100px)")
        side = point_box_um / um_per_px
    else:
        side = DEFAULT_POINT_BOX_PX if point_box_px is None else point_box_px
    if not math.isfinite(side) or side <= 1:
        raise BadInput(f"point-box side must be more than 1 px, got {side:g} px")
    return float(side)


class _ImageFinder:
    """Finds `name` beside the CSV, in common sub-folders, or anywhere below (indexed once)."""

    def __init__(self, root: Path):
        self.root = root
        self.index: dict[str, Path] | None = None

    def __call__(self, name: str, where: str) -> Path:
        p = Path(name.replace("\\", "/"))
        for c in ((p,) if p.is_absolute() else (self.root / p, self.root / "images" / p, self.root / "base" / p)):
            if c.is_file():
                return c
        if self.index is None:
            self.index = {}
            for f in sorted(self.root.rglob("*")):
                if f.suffix.lower() in IMAGE_EXTS:
                    self.index.setdefault(f.name, f)
        if p.name in self.index:
            return self.index[p.name]
        raise BadInput(f"{where}: image {name!r} not found under {self.root}; fix the name or add the image")


def _float(v: str, where: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise BadInput(f"{where}: must be a number, got {v!r}") from None
    if not math.isfinite(x):
        raise BadInput(f"{where}: must be a finite number, got {v!r}")
    return x


def read_cric(csv_path: Path, lm: LabelMap, side_px: float, warnings: list[str]) -> list[ImageRecord]:
    header, rows = read_csv_rows(csv_path)
    c_img = column(header, ("image_filename", "image", "file", "filename"), csv_path)
    c_cell = column(header, ("cell_id", "cell"), csv_path)
    c_cls = column(header, ("bethesda_system", "bethesda", "label"), csv_path)
    c_x = column(header, ("nucleus_x", "x"), csv_path)
    c_y = column(header, ("nucleus_y", "y"), csv_path)
    c_id = header.index("image_id") if "image_id" in header else None
    find = _ImageFinder(csv_path.parent)
    order: list[str] = []
    images: dict[str, tuple[ImageRecord, BoxCollector, set]] = {}
    half = side_px / 2
    for line, f in rows:
        where = f"{csv_path}: line {line}"
        name = f[c_img]
        if not name:
            raise BadInput(f"{where}: {header[c_img]}: empty")
        if name not in images:
            file = find(name, f"{where}: {header[c_img]}")
            w, h = image_size(file, f"{where}: {header[c_img]}")
            iid = f[c_id] if c_id is not None and f[c_id] else name
            iid = int(iid) if isinstance(iid, str) and iid.isdigit() else iid
            images[name] = (ImageRecord(file=file, width=w, height=h, image_id=iid), BoxCollector(w, h, warnings, where=lambda ln: f"{csv_path}: line {ln}: nucleus"), set())
            order.append(name)
        rec, col, cells = images[name]
        if f[c_cell] in cells:
            raise BadInput(f"{where}: {header[c_cell]}: duplicate cell id {f[c_cell]!r} in image {name!r}")
        cells.add(f[c_cell])
        idx = lm.index(f[c_cls])
        if idx is None:
            raise BadInput(f"{where}: {header[c_cls]}: unknown class {f[c_cls]!r}; {lm.unknown_hint()}")
        x, y = _float(f[c_x], f"{where}: {header[c_x]}"), _float(f[c_y], f"{where}: {header[c_y]}")
        if not (0 <= x <= rec.width and 0 <= y <= rec.height):
            raise BadInput(f"{where}: nucleus ({x:g}, {y:g}) lies outside image {name!r} ({rec.width}x{rec.height})")
        if idx == IGNORED:
            continue
        box = (max(x - half, 0.0), max(y - half, 0.0), min(x + half, rec.width), min(y + half, rec.height))
        col.add(box, idx, line)
    out = []
    for name in order:
        rec, col, _ = images[name]
        rec.boxes, rec.labels = col.arrays()
        out.append(rec)
    return out
