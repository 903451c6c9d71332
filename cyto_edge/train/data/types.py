"""In-memory dataset records shared by every reader (torch-free).

Boxes are float32 (K, 4) xyxy in pixels of the full-resolution image; labels are int64 (K,) indices into
`DetectionDataset.classes` (foreground only, 0-based). An image is either *boxed* (its boxes are the
annotation, possibly incomplete) or *weak* (only image-level labels are known; `boxes` is empty).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cyto_edge.runtime.taxonomy import Taxonomy


@dataclass
class ImageRecord:
    file: Path
    width: int
    height: int
    image_id: int | str
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    boxed: bool = True
    image_labels: frozenset[int] | None = None  # None: derived from `labels` (boxed images)
    truth: dict = field(default_factory=dict)    # synth's per-image truth: fov_grade, squamous_count, focus…

    @property
    def classes_present(self) -> frozenset[int]:
        """Image-level labels: given ones for weak images, the boxed classes otherwise."""
        if self.image_labels is not None:
            return self.image_labels
        return frozenset(int(c) for c in self.labels)


@dataclass
class DetectionDataset:
    root: Path
    classes: list[str]
    images: list[ImageRecord]
    taxonomy: Taxonomy | None = None
    um_per_px: float | None = None       # physical scale of the images, when known
    name: str = ""
    warnings: list[str] = field(default_factory=list)  # e.g. skipped degenerate boxes

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, idx) -> "DetectionDataset":
        return DetectionDataset(self.root, self.classes, [self.images[i] for i in idx], self.taxonomy,
                                self.um_per_px, self.name, [])

    def class_counts(self) -> np.ndarray:
        counts = np.zeros(self.num_classes, np.int64)
        for im in self.images:
            np.add.at(counts, im.labels, 1)
        return counts

    def fingerprint(self) -> str:
        """A short hash of file names, sizes and annotations: identifies the data a model was trained on."""
        h = hashlib.sha256()
        h.update(json.dumps(self.classes).encode())
        for im in self.images:
            h.update(f"{Path(im.file).name}|{im.width}x{im.height}|{int(im.boxed)}".encode())
            h.update(np.round(im.boxes, 1).astype(np.float32).tobytes())
            h.update(im.labels.astype(np.int64).tobytes())
        return h.hexdigest()[:16]


@dataclass
class ClassItem:
    """One cell of a classification set: an image file, its class and, when the file holds more than
    the cell (SIPaKMeD's full-field images), the cell's box as float32 (4,) xyxy pixels in that file."""

    file: Path
    label: int
    box: np.ndarray | None = None  # (4,) float32 xyxy px; None: the whole image is the cell
    cell_id: str = ""


@dataclass
class ClassificationDataset:
    root: Path
    classes: list[str]
    items: list[ClassItem]
    taxonomy: Taxonomy | None = None     # class -> Bethesda category, when known
    name: str = ""
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        counts = np.zeros(self.num_classes, np.int64)
        for it in self.items:
            counts[it.label] += 1
        return counts
