"""COCO JSON in the CDetector layout: `<root>/<split>.json` with images in `<root>/<split>/`.

`file_name` is relative to the split folder, or already includes it (relative to the json's folder),
or absolute. Categories are mapped by name. Extensions (written by `cyto-edge synth` and `data split`):
`info.um_per_px` (float), per image `truth: {...}` (kept as a dict) and `image_labels: [names]` (a weak
image: only its image-level labels are known; it has no boxes).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.train.data.common import DEGENERATE_PX, OUT_TOLERANCE_PX, BoxCollector, check_unique_ids
from cyto_edge.train.data.imageinfo import image_size, resolve
from cyto_edge.train.data.labels import IGNORED, LabelMap
from cyto_edge.train.data.types import DetectionDataset, ImageRecord


def read_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: malformed JSON (not UTF-8 text at byte {e.start})") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _list(d: dict, key: str, path: Path, required: bool = True) -> list:
    v = d.get(key)
    if v is None and not required:
        return []
    if not isinstance(v, list):
        raise BadInput(f"{path}: {key}: must be a list" + (" (missing)" if v is None else ""))
    return v


def _is_id(v) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _image_id(v, where: str):
    if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, str) and not v.strip()):
        raise BadInput(f"{where}: must be an integer or a non-empty string, got {v!r}")
    return v


def _categories(cats: list, path: Path, lm: LabelMap) -> dict:
    """category id -> class index (or IGNORED); unknown names are errors."""
    out: dict = {}
    for i, c in enumerate(cats):
        where = f"{path}: categories[{i}]"
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise BadInput(f"{where}: each category needs 'id' and 'name'")
        if not _is_id(c["id"]):
            raise BadInput(f"{where}.id: must be an integer or a string, got {c['id']!r}")
        if c["id"] in out:
            raise BadInput(f"{where}.id: duplicate category id {c['id']!r}")
        idx = lm.index(c["name"])
        if idx is None:
            raise BadInput(f"{where}.name: unknown category {c['name']!r}; {lm.unknown_hint()}")
        out[c["id"]] = idx
    return out


def _weak_labels(names, where: str, lm: LabelMap) -> frozenset[int]:
    if not isinstance(names, list):
        raise BadInput(f"{where}: must be a list of class names")
    out = set()
    for n in names:
        idx = lm.index(n)
        if idx is None:
            raise BadInput(f"{where}: unknown class {n!r}; {lm.unknown_hint()}")
        if idx != IGNORED:
            out.add(idx)
    return frozenset(out)


def _image_record(im, i: int, path: Path, bases: list[Path], lm: LabelMap) -> ImageRecord:
    where = f"{path}: images[{i}]"
    if not isinstance(im, dict):
        raise BadInput(f"{where}: must be an object with id and file_name")
    iid = _image_id(im.get("id"), f"{where}.id")
    name = im.get("file_name")
    if not isinstance(name, str) or not name:
        raise BadInput(f"{where}.file_name: missing")
    file = resolve(name, bases, f"{where}.file_name")
    w, h = im.get("width"), im.get("height")
    if w is None or h is None:
        w, h = image_size(file, f"{where}.file_name")
    for k, v in (("width", w), ("height", h)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or v != int(v):
            raise BadInput(f"{where}.{k}: must be a positive integer, got {v!r}")
    truth = im.get("truth") or {}
    if not isinstance(truth, dict):
        raise BadInput(f"{where}.truth: must be an object")
    rec = ImageRecord(file=file, width=int(w), height=int(h), image_id=iid, truth=dict(truth))
    if "image_labels" in im:
        rec.boxed = False
        rec.image_labels = _weak_labels(im["image_labels"], f"{where}.image_labels", lm)
    return rec


def _um_per_px(d: dict, path: Path) -> float | None:
    info = d.get("info") or {}
    v = info.get("um_per_px") if isinstance(info, dict) else None
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise BadInput(f"{path}: info.um_per_px: must be a positive number, got {v!r}")
    return float(v)


def read_coco(path: Path, images_dir: Path | None, lm: LabelMap) -> DetectionDataset:
    """Read one COCO json. `images_dir` is the split folder (`<root>/<split>/`), tried before the json's
    own folder when resolving `file_name`."""
    d = read_json(path)
    if not isinstance(d, dict):
        raise BadInput(f"{path}: must be a COCO object with images, annotations and categories")
    images = _list(d, "images", path)
    anns = _list(d, "annotations", path, required=False)
    cats = _categories(_list(d, "categories", path, required=bool(anns)), path, lm)
    bases = [b for b in (images_dir, path.parent) if b is not None]
    records = [_image_record(im, i, path, bases, lm) for i, im in enumerate(images)]
    check_unique_ids(records, f"{path}: images", indexed=True)
    ds = DetectionDataset(root=path.parent, classes=lm.classes, images=records, taxonomy=lm.taxonomy,
                          um_per_px=_um_per_px(d, path), name=path.stem)
    _read_annotations(anns, path, records, cats, ds.warnings)
    return ds


def _ann_where(path: Path, image_id):
    return lambda i: f"{path}: annotations[{i}].bbox (image {image_id!r})"


def _fast_annotations(anns: list, path: Path, records: list[ImageRecord], cats: dict, warnings: list) -> bool:
    """The common case in numpy: every annotation well-formed, on a boxed image, of a known class, no
    crowd boxes, every box inside its image. Returns False (nothing changed) when anything is unusual;
    `_read_annotations` then finds and names the problem."""
    if not anns:
        return True
    try:
        if not all(type(a) is dict and not a.get("iscrowd") for a in anns):
            return False
        by_id = {(type(r.image_id), r.image_id): k for k, r in enumerate(records)}
        img = np.array([by_id[(type(a["image_id"]), a["image_id"])] for a in anns], np.int64)  # (N,)
        cls = np.array([cats[a["category_id"]] for a in anns], np.int64)
        ids = [a["id"] for a in anns]
        b = np.array([a["bbox"] for a in anns], np.float64).reshape(len(anns), 4)  # (N, 4) xywh px
    except (KeyError, TypeError, ValueError):
        return False
    if (cls == IGNORED).any() or len(set(ids)) != len(ids) or not all(_is_id(i) for i in ids):
        return False
    if not all(records[k].boxed for k in set(img.tolist())):
        return False
    wh = np.array([(r.width, r.height) for r in records], np.float64).reshape(-1, 2)[img]  # (N, 2) px
    b[:, 2:] += b[:, :2]  # xyxy
    t = OUT_TOLERANCE_PX
    if (~np.isfinite(b).all(1) | (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]) | (b[:, :2] < -t).any(1)
            | (b[:, 2:] > wh + t).any(1)).any():
        return False
    b[:, :2] = b[:, :2].clip(0, None)
    b[:, 2:] = np.minimum(b[:, 2:], wh)
    side = b[:, 2:] - b[:, :2]
    degenerate = (side <= DEGENERATE_PX).any(1)
    for i in np.flatnonzero(degenerate):
        warnings.append(f"{path}: annotations[{i}].bbox (image {records[img[i]].image_id!r}): degenerate box "
                        f"{side[i, 0]:.1f}x{side[i, 1]:.1f} px skipped")
    keep = np.flatnonzero(~degenerate)
    order = keep[np.argsort(img[keep], kind="stable")]
    bounds = np.searchsorted(img[order], np.arange(len(records) + 1))
    for k, r in enumerate(records):
        sel = order[bounds[k]:bounds[k + 1]]
        if len(sel):
            r.boxes, r.labels = b[sel].astype(np.float32), cls[sel]
    return True


def _read_annotations(anns: list, path: Path, records: list[ImageRecord], cats: dict, warnings: list) -> None:
    if _fast_annotations(anns, path, records, cats, warnings):
        return
    by_id = {(type(r.image_id), r.image_id): k for k, r in enumerate(records)}
    collectors: dict[int, BoxCollector] = {}
    ann_ids: set = set()
    weak_with_boxes: set[int] = set()
    for i, a in enumerate(anns):
        where = lambda: f"{path}: annotations[{i}]"  # noqa: E731 - built only for a message
        if not isinstance(a, dict):
            raise BadInput(f"{where()}: must be an object with image_id, category_id and bbox")
        aid, iid, cid = a.get("id"), a.get("image_id"), a.get("category_id")
        if aid is not None:
            if not _is_id(aid):
                _image_id(aid, f"{where()}.id")  # raises
            if (type(aid), aid) in ann_ids:
                raise BadInput(f"{where()}.id: duplicate annotation id {aid!r}; annotation ids must be unique")
            ann_ids.add((type(aid), aid))
        k = by_id.get((type(iid), iid)) if _is_id(iid) else None
        if k is None:
            raise BadInput(f"{where()}.image_id: no image with id {iid!r}")
        cls = cats.get(cid) if _is_id(cid) else None
        if cls is None:
            raise BadInput(f"{where()}.category_id: no category with id {a.get('category_id')!r}")
        rec = records[k]
        if cls == IGNORED:
            continue
        if not rec.boxed:
            weak_with_boxes.add(k)
            continue
        if a.get("iscrowd", 0):
            warnings.append(f"{where()}: iscrowd box skipped")
            continue
        bbox = a.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise BadInput(f"{where()}.bbox: must be [x, y, width, height], got {bbox!r}")
        col = collectors.get(k)
        if col is None:
            col = collectors[k] = BoxCollector(rec.width, rec.height, warnings, xywh=True,
                                               where=_ann_where(path, rec.image_id))
        col.add(bbox, cls, i)
    for k, col in collectors.items():
        records[k].boxes, records[k].labels = col.arrays()
    for k in sorted(weak_with_boxes):
        warnings.append(f"{path}: image {records[k].image_id!r} has image_labels (weak) and boxes; "
                        "its boxes were ignored")


def to_coco(ds: DetectionDataset, json_dir: Path) -> dict:
    """A COCO dict of `ds` (with the extensions), file names relative to `json_dir`."""
    images, anns = [], []
    aid = 0
    for r in ds.images:
        f = Path(r.file)
        try:
            name = f.resolve().relative_to(json_dir.resolve()).as_posix()
        except ValueError:
            name = str(f.resolve())
        im = {"id": r.image_id, "file_name": name, "width": int(r.width), "height": int(r.height)}
        if r.truth:
            im["truth"] = r.truth
        if not r.boxed:
            im["image_labels"] = sorted(ds.classes[c] for c in r.classes_present)
        images.append(im)
        for b, c in zip(r.boxes.tolist(), r.labels.tolist()):
            aid += 1
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": aid, "image_id": r.image_id, "category_id": int(c) + 1,
                         "bbox": [round(v, 2) for v in (b[0], b[1], w, h)], "area": round(w * h, 2),
                         "iscrowd": 0})
    info = {"description": ds.name or "cyto-edge dataset"}
    if ds.um_per_px is not None:
        info["um_per_px"] = ds.um_per_px
    cats = [{"id": i + 1, "name": n, "supercategory": ds.taxonomy.category(n) if ds.taxonomy else "cell"}
            for i, n in enumerate(ds.classes)]
    return {"info": info, "images": images, "annotations": anns, "categories": cats}


def write_coco(ds: DetectionDataset, path: Path) -> Path:
    """Write `ds` as COCO json at `path` (atomically: temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_coco(ds, path.parent)))
    tmp.replace(path)
    return path
