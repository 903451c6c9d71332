"""Cell classification sets: the SIPaKMeD layout and plain class folders.

SIPaKMeD: `im_<Class>/` (possibly nested once more, as the archives unpack) holding full fields
`NNN.bmp` with one polygon per cell, `NNN_cytKK.dat` (cytoplasm) and `NNN_nucKK.dat` (nucleus), each a
text file of `x,y` float pairs, one per line; and `CROPPED/` with one image per cell. A cell's box is
the bounding box of its cytoplasm polygon. Plain class folders: `root/<class>/*.png|jpg|bmp`.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.runtime.taxonomy import Taxonomy
from cyto_edge.train.data.common import BoxCollector
from cyto_edge.train.data.imageinfo import IMAGE_EXTS, image_size, is_image
from cyto_edge.train.data.labels import IGNORED, load_label_map
from cyto_edge.train.data.types import ClassificationDataset, ClassItem

#: SIPaKMeD's five classes and their Bethesda categories. Koilocytes and dyskeratocytes are the
#: cytopathic changes of HPV that define LSIL; a lab that grades dyskeratotic cells higher brings a
#: mapping file.
SIPAKMED_TAXONOMY = Taxonomy(
    classes=("dyskeratotic", "koilocytotic", "metaplastic", "parabasal", "superficial_intermediate"),
    mapping={"dyskeratotic": "LSIL", "koilocytotic": "LSIL", "metaplastic": "NILM", "parabasal": "NILM",
             "superficial_intermediate": "NILM"},
    organisms=(), aliases={"superficial-intermediate": "superficial_intermediate",
                           "superficial intermediate": "superficial_intermediate"},
)
_CYT = re.compile(r"^(?P<img>.+)_cyt(?P<cell>\d+)$", re.IGNORECASE)


def class_name(folder: str) -> str:
    name = folder[3:] if folder.lower().startswith("im_") else folder
    return re.sub(r"[\s\-]+", "_", name.strip()).lower()


def read_polygon(path: Path) -> np.ndarray:
    """(N, 2) float32 x, y pixels from a .dat file of `x,y` lines; malformed -> BadInput with the line."""
    pts = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from None
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        parts = [p for p in re.split(r"[,\s;]+", ln.strip()) if p]
        try:
            if len(parts) != 2:
                raise ValueError
            pts.append((float(parts[0]), float(parts[1])))
        except ValueError:
            raise BadInput(f"{path}: line {i}: malformed polygon point {ln.strip()!r} (expected 'x,y')") from None
    if len(pts) < 3:
        raise BadInput(f"{path}: polygon has {len(pts)} points; a cell outline needs at least 3")
    return np.asarray(pts, np.float32)


def _sipakmed_dirs(root: Path) -> list[Path]:
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("im_")):
        inner = d / d.name
        out.append(inner if inner.is_dir() else d)
    return out


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTS:
        for e in (ext, ext.upper()):
            if (folder / (stem + e)).is_file():
                return folder / (stem + e)
    return None


def _cells(folder: Path, label: int, warnings: list[str]) -> list[ClassItem]:
    """One item per `NNN_cytKK.dat`: the full field NNN with the polygon's bounding box."""
    items = []
    sizes: dict[str, tuple[int, int]] = {}
    for dat in sorted(folder.glob("*.dat")):
        m = _CYT.match(dat.stem)
        if not m:
            continue
        img = _find_image(folder, m["img"])
        if img is None:
            raise BadInput(f"{dat}: no image {m['img']}.bmp beside the cytoplasm polygon; add it or remove the .dat")
        if m["img"] not in sizes:
            sizes[m["img"]] = image_size(img, str(dat))
        w, h = sizes[m["img"]]
        poly = read_polygon(dat)  # (N, 2) x, y px
        col = BoxCollector(w, h, warnings, where=lambda _, dat=dat: f"{dat}: polygon")
        col.add((*poly.min(0), *poly.max(0)), label, 0)
        boxes, _ = col.arrays()  # (0 or 1, 4) xyxy px: a degenerate outline is skipped with a warning
        if len(boxes):
            items.append(ClassItem(file=img, label=label, box=boxes[0], cell_id=f"{m['img']}_{m['cell']}"))
    return items


def _crops(folder: Path, label: int) -> list[ClassItem]:
    crop_dir = folder / "CROPPED"
    files = sorted(p for p in crop_dir.iterdir() if is_image(p)) if crop_dir.is_dir() else []
    return [ClassItem(file=p, label=label, cell_id=p.stem) for p in files]


def _taxonomy(names: list[str], mapping, builtin: Taxonomy | None, root: Path) -> tuple[list[str], list[int], Taxonomy | None]:
    """(classes, index of each folder's class, taxonomy) for folder class names."""
    if mapping is not None:
        lm = load_label_map(mapping)
        idx = []
        for n in names:
            i = lm.index(n)
            if i is None:
                raise BadInput(f"{root / n}: folder class {n!r} is not in {lm.source}; {lm.unknown_hint()}")
            idx.append(i)
        return lm.classes, idx, lm.taxonomy
    for tax in (builtin, Taxonomy()):
        if tax is not None and all(tax.index(n) is not None for n in names):
            return list(tax.classes), [tax.index(n) for n in names], tax
    classes = sorted(set(names))
    return classes, [classes.index(n) for n in names], None


def read_sipakmed(root: Path, mapping=None, source: str = "auto") -> ClassificationDataset:
    """`source`: "cells" (full fields + cytoplasm boxes), "crops" (CROPPED/ images) or "auto" (cells
    where a class folder has polygons, crops otherwise)."""
    dirs = _sipakmed_dirs(root)
    classes, idx, tax = _taxonomy([class_name(d.name) for d in dirs], mapping, SIPAKMED_TAXONOMY, root)
    ds = ClassificationDataset(root=root, classes=classes, items=[], taxonomy=tax, name=root.name)
    for d, label in zip(dirs, idx):
        if label == IGNORED:
            continue
        cells = _cells(d, label, ds.warnings) if source in ("auto", "cells") else []
        ds.items += cells if cells or source == "cells" else _crops(d, label)
    return ds


def read_class_folders(root: Path, mapping=None) -> ClassificationDataset:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and any(is_image(f) for f in p.iterdir()))
    classes, idx, tax = _taxonomy([d.name for d in dirs], mapping, None, root)
    ds = ClassificationDataset(root=root, classes=classes, items=[], taxonomy=tax, name=root.name)
    for d, label in zip(dirs, idx):
        if label != IGNORED:
            ds.items += [ClassItem(file=p, label=label, cell_id=p.stem) for p in sorted(d.iterdir()) if is_image(p)]
    return ds


def is_sipakmed(root: Path) -> bool:
    return root.is_dir() and any(p.is_dir() and p.name.lower().startswith("im_") for p in root.iterdir())


def is_class_folders(root: Path) -> bool:
    return root.is_dir() and any(p.is_dir() and any(is_image(f) for f in p.iterdir()) for p in root.iterdir())
