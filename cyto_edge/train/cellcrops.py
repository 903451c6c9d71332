"""Cell crops for the second-stage models (torch-free: numpy + OpenCV).

The crop geometry is part of the exported models' contract (`cyto_edge.export.second_stage`):
for a box (x1, y1, x2, y2) in pixels of the full-resolution image at the model's scale, the window is the
square centred on the box centre with side `fixed_side` px when set, else max(w, h) * (1 + 2 * context);
pixels outside the image repeat the border (BORDER_REPLICATE); the window is resized to size x size
(INTER_AREA when shrinking, INTER_LINEAR when enlarging); colour order RGB, uint8.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cyto_edge.errors import BadInput

#: The reserved class of background crops cut away from every box (Bethesda NILM).
BACKGROUND = "normal"


@dataclass(frozen=True)
class CropSpec:
    context: float = 0.25             # margin on each side, as a fraction of the box's longer side
    fixed_side: float | None = None   # px at the model's scale: a constant window (keeps absolute size)

    def to_dict(self) -> dict:
        return {**asdict(self), "square": True, "border": "replicate", "color": "RGB"}


def to_rgb(img: np.ndarray | None, where: str) -> np.ndarray:
    """Any decoded image (gray, gray+alpha, BGR, BGRA; 8 or 16 bit) -> uint8 (H, W, 3) RGB, else BadInput."""
    if img is None:
        raise BadInput(f"{where}: cannot decode the image (missing, corrupt or not an image)")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise BadInput(f"{where}: pixel type {img.dtype} is not supported; save as 8- or 16-bit PNG/JPEG/BMP")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    ch = img.shape[2]
    if ch == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if ch == 2:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if ch == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if ch == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise BadInput(f"{where}: {ch} channels; a cell image must be gray, RGB or RGBA")


def read_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB from a file of any channel layout."""
    return to_rgb(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), str(path))


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) -> (size, size, 3): a plain resize (the paper's 'adjusted to 80x80')."""
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def cut_crop(img: np.ndarray, box, size: int, spec: CropSpec = CropSpec()) -> np.ndarray:
    """img (H, W, 3) uint8; box (4,) xyxy px -> (size, size, 3) uint8 (geometry in the module docstring)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    side = spec.fixed_side if spec.fixed_side else max(x2 - x1, y2 - y1, 1.0) * (1 + 2 * spec.context)
    s = max(int(round(side)), 2)
    left, top = int(round(cx - s / 2)), int(round(cy - s / 2))
    H, W = img.shape[:2]
    pad = [max(0, -top), max(0, top + s - H), max(0, -left), max(0, left + s - W)]
    if any(pad):
        img = cv2.copyMakeBorder(img, *pad, cv2.BORDER_REPLICATE)
        top, left = top + pad[0], left + pad[2]
    return resize_square(img[top:top + s, left:left + s], size)


def raster_order(boxes: np.ndarray, row_px: float = 32.0) -> np.ndarray:
    """Index order of boxes (K, 4) xyxy px by their centres: rows of `row_px`, then left to right.
    The learned grader reads its cells in this order (training and runtime alike)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    return np.lexsort((cx, np.floor(cy / row_px))).astype(np.int64)


@dataclass
class CropSet:
    """Cell crops in memory: images uint8 (N, S, S, 3) RGB, labels int64 (N,) into `classes`."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    bethesda: dict[str, str] | None = None
    spec: CropSpec | None = None      # None: whole images resized (a crop set), else cut around boxes
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))

    def subset(self, idx) -> "CropSet":
        return CropSet(self.images[idx], self.labels[idx], self.classes, self.bethesda, self.spec, self.source)


def _bethesda(taxonomy, classes: list[str]) -> dict[str, str] | None:
    if taxonomy is None:
        return None
    try:
        return {c: (taxonomy.category(c) if c != BACKGROUND else "NILM") for c in classes}
    except (KeyError, ValueError):
        return None


def from_classification(ds, size: int, spec: CropSpec = CropSpec(), progress=None) -> CropSet:
    """A ClassificationDataset (SIPaKMeD / class folders) -> CropSet at size x size.
    Items with a box are cut from their full field with `spec`; whole-image items are resized."""
    imgs = np.zeros((len(ds.items), size, size, 3), np.uint8)
    cache: dict[Path, np.ndarray] = {}
    for i, it in enumerate(ds.items):
        if it.box is None:
            imgs[i] = resize_square(read_rgb(it.file), size)
        else:
            if it.file not in cache:
                cache.clear()                                  # items of one field are consecutive
                cache[it.file] = read_rgb(it.file)
            imgs[i] = cut_crop(cache[it.file], it.box, size, spec)
        if progress:
            progress(i + 1, len(ds.items))
    labels = np.asarray([it.label for it in ds.items], np.int64)
    has_boxes = any(it.box is not None for it in ds.items)
    return CropSet(imgs, labels, list(ds.classes), _bethesda(ds.taxonomy, list(ds.classes)),
                   spec if has_boxes else None, str(ds.root), list(ds.warnings))


def _background_boxes(rng, boxes: np.ndarray, W: int, H: int, k: int, side: float) -> list[np.ndarray]:
    """Up to k square boxes of `side` px inside the image that do not overlap any labelled box."""
    out, tries = [], 0
    while len(out) < k and tries < 50 * k and W > side and H > side:
        tries += 1
        x, y = rng.uniform(0, W - side), rng.uniform(0, H - side)
        b = np.array([x, y, x + side, y + side], np.float32)
        if len(boxes) and np.any((np.minimum(boxes[:, 2], b[2]) > np.maximum(boxes[:, 0], b[0])) &
                                 (np.minimum(boxes[:, 3], b[3]) > np.maximum(boxes[:, 1], b[1]))):
            continue
        out.append(b)
    return out


def from_detection(ds, size: int, spec: CropSpec = CropSpec(), background_per_image: int = 0,
                   seed: int = 0, progress=None) -> CropSet:
    """A DetectionDataset -> crops around every box (label = its class) plus, when asked, crops of
    `BACKGROUND` cut where no box is (normal cells, debris, empty glass). Classes without any crop are
    dropped with a warning. Weak (image-label-only) images are skipped."""
    rng = np.random.default_rng(seed)
    crops, labels, warnings = [], [], []
    bg_label = len(ds.classes)
    sizes = [float(np.max(b[2:] - b[:2])) for im in ds.images for b in im.boxes] or [64.0]
    bg_side = float(np.median(sizes)) * (1 + 2 * spec.context)
    for i, im in enumerate(ds.images):
        if not im.boxed or (len(im.boxes) == 0 and background_per_image == 0):
            continue
        img = read_rgb(im.file)
        for b, lab in zip(im.boxes, im.labels):
            crops.append(cut_crop(img, b, size, spec))
            labels.append(int(lab))
        for b in _background_boxes(rng, im.boxes, im.width, im.height, background_per_image, bg_side):
            crops.append(cut_crop(img, b, size, CropSpec(context=0.0, fixed_side=spec.fixed_side)))
            labels.append(bg_label)
        if progress:
            progress(i + 1, len(ds.images))
    if not crops:
        raise BadInput(f"{ds.root}: no boxed cells to cut crops from; give a detection set with boxes")
    names = list(ds.classes) + [BACKGROUND]
    counts = np.bincount(np.asarray(labels), minlength=len(names))
    keep = [k for k in range(len(names)) if counts[k] > 0]
    dropped = [names[k] for k in range(len(names)) if counts[k] == 0 and names[k] != BACKGROUND]
    if dropped:
        warnings.append(f"classes without any box, left out of the classifier: {', '.join(dropped)}")
    remap = {old: new for new, old in enumerate(keep)}
    classes = [names[k] for k in keep]
    return CropSet(np.stack(crops), np.asarray([remap[v] for v in labels], np.int64), classes,
                   _bethesda(ds.taxonomy, classes), spec, str(ds.root), warnings)
