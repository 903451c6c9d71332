"""Image-level labels for weak supervision: a CSV `file,labels`, one image per line.

`labels` holds class names separated by `;` (or `|`, or spaces); an empty field is an image known to
hold none of the classes. File names are resolved like COCO's (split folder, then the CSV's folder).
"""
from __future__ import annotations

import re
from pathlib import Path

from cyto_edge.errors import BadInput
from cyto_edge.train.data.common import column, read_csv_rows
from cyto_edge.train.data.imageinfo import image_size, resolve
from cyto_edge.train.data.labels import IGNORED, LabelMap
from cyto_edge.train.data.types import ImageRecord

FILE_COLUMNS = ("file", "file_name", "filename", "image", "image_filename")


def split_names(field: str, lm: LabelMap) -> list[str]:
    """'lsil;trich' / 'lsil|trich' / 'lsil trich' -> names; a multi-word single name stays whole."""
    field = field.strip()
    if not field:
        return []
    if ";" in field or "|" in field:
        return [n.strip() for n in re.split(r"[;|]", field) if n.strip()]
    if lm.index(field) is not None:
        return [field]
    return field.split()


def read_labels_csv(path: Path, bases: list[Path], lm: LabelMap) -> list[ImageRecord]:
    """Weak image records (boxed=False) from a `file,labels` CSV."""
    header, rows = read_csv_rows(path)
    fcol = column(header, FILE_COLUMNS, path)
    lcol = column(header, ("labels", "label", "classes"), path)
    out = []
    for line, fields in rows:
        where = f"{path}: line {line}"
        if not fields[fcol]:
            raise BadInput(f"{where}: file: empty")
        labels = set()
        for n in split_names(fields[lcol], lm):
            idx = lm.index(n)
            if idx is None:
                raise BadInput(f"{where}: labels: unknown class {n!r}; {lm.unknown_hint()}")
            if idx != IGNORED:
                labels.add(idx)
        file = resolve(fields[fcol], bases, f"{where}: file")
        w, h = image_size(file, f"{where}: file")
        out.append(ImageRecord(file=file, width=w, height=h, image_id=fields[fcol], boxed=False,
                               image_labels=frozenset(labels)))
    return out
