"""Shared checks for readers: box validation, duplicate ids, one-line parse errors."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.train.data.types import ImageRecord

#: A box may stick out of the image by this much (rounding in annotation tools); it is clipped.
OUT_TOLERANCE_PX = 1.0
#: Boxes whose clipped width or height is at most this are skipped with a warning.
DEGENERATE_PX = 1.0


class BoxCollector:
    """Accumulates the boxes of one image, validating each: xyxy pixels, clipped to the image."""

    def __init__(self, width: int, height: int, warnings: list[str]):
        self.w, self.h = width, height
        self.warnings = warnings
        self.boxes: list[tuple[float, float, float, float]] = []
        self.labels: list[int] = []

    def add(self, xyxy, label: int, where: str) -> None:
        try:
            x1, y1, x2, y2 = (float(v) for v in xyxy)
        except (TypeError, ValueError):
            raise BadInput(f"{where}: box must be 4 numbers, got {xyxy!r}") from None
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise BadInput(f"{where}: box {[x1, y1, x2, y2]} has a non-finite coordinate")
        if x2 < x1 or y2 < y1:
            raise BadInput(f"{where}: box has negative size (x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g}); "
                           "boxes are x1 <= x2, y1 <= y2")
        t = OUT_TOLERANCE_PX
        if x1 < -t or y1 < -t or x2 > self.w + t or y2 > self.h + t:
            raise BadInput(f"{where}: box (x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g}) lies outside the image "
                           f"({self.w}x{self.h}); fix the box or the image size")
        x1, x2 = min(max(x1, 0.0), self.w), min(max(x2, 0.0), self.w)
        y1, y2 = min(max(y1, 0.0), self.h), min(max(y2, 0.0), self.h)
        if x2 - x1 <= DEGENERATE_PX or y2 - y1 <= DEGENERATE_PX:
            self.warnings.append(f"{where}: degenerate box {x2 - x1:.1f}x{y2 - y1:.1f} px skipped")
            return
        self.boxes.append((x1, y1, x2, y2))
        self.labels.append(int(label))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)  # (K, 4) xyxy px
        return boxes, np.asarray(self.labels, np.int64)


def check_unique_ids(records: list[ImageRecord], where: str, indexed: bool = False) -> None:
    """Image ids and files are unique; `indexed`: name the duplicate as `where[i].id`."""
    seen: dict = {}
    files: dict = {}
    for i, r in enumerate(records):
        key = (type(r.image_id).__name__, r.image_id)
        if key in seen:
            field = f"{where}[{i}].id" if indexed else where
            raise BadInput(f"{field}: duplicate image id {r.image_id!r}; image ids must be unique")
        seen[key] = r
        f = str(Path(r.file).resolve())
        if f in files:
            raise BadInput(f"{where}: image {r.file} is listed twice (ids {files[f].image_id!r} and "
                           f"{r.image_id!r}); list each image once")
        files[f] = r


def read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header lowercased, [(line number, fields)]) of a CSV file; malformed -> BadInput with the line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: malformed CSV (not UTF-8 text at byte {e.start})") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from None
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    rows: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    try:
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue
            if header is None:
                header = [f.strip().lower() for f in fields]
                continue
            if len(fields) != len(header):
                raise BadInput(f"{path}: line {reader.line_num}: malformed CSV row: {len(fields)} fields, "
                               f"the header has {len(header)} ({', '.join(header)})")
            rows.append((reader.line_num, [f.strip() for f in fields]))
    except csv.Error as e:
        raise BadInput(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    if header is None:
        raise BadInput(f"{path}: empty CSV file (expected a header line)")
    return header, rows


def column(header: list[str], names: tuple[str, ...], path: Path) -> int:
    for n in names:
        if n in header:
            return header.index(n)
    raise BadInput(f"{path}: line 1: missing column {names[0]!r} (header is {', '.join(header)})")
