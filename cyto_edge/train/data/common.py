"""Shared checks for readers: box validation, duplicate ids, one-line parse errors."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Callable

import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.train.data.types import ImageRecord

#: A box may stick out of the image by this much (rounding in annotation tools); it is clipped.
OUT_TOLERANCE_PX = 1.0
#: Boxes whose clipped width or height is at most this are skipped with a warning.
DEGENERATE_PX = 1.0


class BoxCollector:
    """Accumulates the boxes of one image and validates them together (numpy, fast for big sets).

    `add(box, label, key)`: box is xyxy pixels (or COCO's xywh with `xywh=True`); `where(key)` names
    the annotation in a message (only built when something is wrong). `arrays()` returns float32 (K, 4)
    xyxy boxes clipped to the image and int64 (K,) labels, skipping boxes of 1 px or less with a warning.
    """

    def __init__(self, width: int, height: int, warnings: list[str], where: Callable = str, xywh: bool = False):
        self.w, self.h = width, height
        self.warnings = warnings
        self.where, self.xywh = where, xywh
        self.raw: list = []
        self.labels: list[int] = []
        self.keys: list = []

    def add(self, box, label: int, key) -> None:
        self.raw.append(box)
        self.labels.append(int(label))
        self.keys.append(key)

    def _numbers(self) -> np.ndarray:
        try:
            return np.asarray(self.raw, np.float64).reshape(-1, 4)
        except (TypeError, ValueError):
            for box, key in zip(self.raw, self.keys):
                try:
                    np.asarray(box, np.float64).reshape(4)
                except (TypeError, ValueError):
                    raise BadInput(f"{self.where(key)}: box must be 4 numbers, got {box!r}") from None
            raise

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        b = self._numbers()  # (K, 4) float64
        if self.xywh:
            b = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)
        bad = ~np.isfinite(b).all(1)
        neg = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
        t = OUT_TOLERANCE_PX
        out = (b[:, 0] < -t) | (b[:, 1] < -t) | (b[:, 2] > self.w + t) | (b[:, 3] > self.h + t)
        for k in np.flatnonzero(bad | neg | out)[:1]:
            self._fail(int(k), b[k], bool(bad[k]), bool(neg[k]))
        b[:, 0::2] = b[:, 0::2].clip(0, self.w)
        b[:, 1::2] = b[:, 1::2].clip(0, self.h)
        wh = b[:, 2:] - b[:, :2]
        degenerate = (wh <= DEGENERATE_PX).any(1)
        for k in np.flatnonzero(degenerate):
            self.warnings.append(f"{self.where(self.keys[k])}: degenerate box {wh[k, 0]:.1f}x{wh[k, 1]:.1f} px skipped")
        keep = ~degenerate
        return b[keep].astype(np.float32), np.asarray(self.labels, np.int64)[keep]

    def _fail(self, k: int, box: np.ndarray, nonfinite: bool, negative: bool) -> None:
        x1, y1, x2, y2 = (float(v) for v in box)
        where = self.where(self.keys[k])
        if nonfinite:
            raise BadInput(f"{where}: box {self.raw[k]!r} has a non-finite or missing coordinate")
        if negative:
            raise BadInput(f"{where}: box has negative size (x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g}); "
                           "boxes are x1 <= x2, y1 <= y2")
        raise BadInput(f"{where}: box (x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g}) lies outside the image "
                       f"({self.w}x{self.h}); fix the box or the image size")


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
        f = os.path.normpath(os.path.abspath(r.file))
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
