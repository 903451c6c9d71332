"""One entry point per task: `load_detection` and `load_classification` detect the format of PATH.

Detection formats (`detect_format`):
- "coco":  a directory with `<split>.json` (CDetector: train.json, test.json, images in train/, test/),
           or one .json file; `<split>_labels.csv` beside it adds weak (image-level) images.
- "voc":   `Annotations/*.xml` + `JPEGImages/`, or .xml files beside their images (+ `labels.csv`).
- "cric":  `classifications.csv` (nucleus points -> square boxes).
- "weak":  only image-level labels: `labels.csv` / `<split>_labels.csv` (or that .csv file).
Classification formats: "sipakmed" (`im_<Class>/`) and "folders" (`root/<class>/*.png`).

Loading reads annotation files and image headers only; `check.verify_images` decodes the images.
"""
from __future__ import annotations

import os
from pathlib import Path

from cyto_edge.errors import BadInput
from cyto_edge.train.data import classification as cls_mod
from cyto_edge.train.data.common import check_unique_ids, read_csv_rows
from cyto_edge.train.data.labels import CRIC_IGNORE, load_label_map
from cyto_edge.train.data.types import ClassificationDataset, DetectionDataset

SPLIT_NAMES = ("train", "val", "test")
LAYOUTS = ("train.json/test.json (COCO), Annotations/*.xml (VOC), classifications.csv (CRIC), "
           "labels.csv (image-level labels), im_<Class>/ (SIPaKMeD) or <class>/ folders of images")


def _csv_kind(path: Path) -> str:
    header, _ = read_csv_rows(path)
    return "cric" if "nucleus_x" in header or "bethesda_system" in header else "weak"


def _label_csvs(d: Path) -> dict[str, Path]:
    """split name (None for plain labels.csv) -> CSV of image-level labels in folder `d`."""
    out: dict = {}
    if (d / "labels.csv").is_file():
        out[None] = d / "labels.csv"
    for p in sorted(d.glob("*_labels.csv")):
        out[p.name[: -len("_labels.csv")]] = p
    return out


def _coco_jsons(d: Path) -> dict[str, Path]:
    """split name -> json: train, val, test first, then the .split files of `data split`."""
    jsons = {p.name[:-5]: p for p in sorted(d.glob("*.json"))}
    named = [k for k in SPLIT_NAMES if k in jsons] + sorted(k for k in jsons if k.endswith(".split"))
    return {k: jsons[k] for k in named} if named else jsons


def detect_format(path: str | Path) -> str:
    """The dataset format of `path` (see the module docstring); BadInput when none fits."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p}: no such file or directory")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".json":
            return "coco"
        if suffix == ".xml":
            return "voc"
        if suffix == ".csv":
            return _csv_kind(p)
        raise BadInput(f"{p}: not a dataset file (expected .json, .xml or .csv, or a directory with {LAYOUTS})")
    if _coco_jsons(p):
        return "coco"
    if (p / "classifications.csv").is_file():
        return "cric"
    from cyto_edge.train.data.voc import voc_layout

    if voc_layout(p):
        return "voc"
    if _label_csvs(p):
        return "weak"
    if cls_mod.is_sipakmed(p):
        return "sipakmed"
    if cls_mod.is_class_folders(p):
        return "folders"
    raise BadInput(f"{p}: no dataset found; expected {LAYOUTS}")


def available_splits(path: str | Path) -> list[str | None]:
    """Split names `load_detection(path, split=...)` accepts ([None] when the set has no splits)."""
    p = Path(path)
    fmt = detect_format(p)
    if p.is_file():
        return [None]
    if fmt == "coco":
        return list(_coco_jsons(p))
    if fmt == "weak":
        return list(_label_csvs(p))
    if fmt == "voc":
        sets = p / "ImageSets" / "Main"
        names = [s for s in SPLIT_NAMES if (sets / f"{s}.txt").is_file()]
        return names or [None]
    return [None]


def _is_coco_dir(path: Path) -> bool:
    return path.is_dir() and detect_format(path) == "coco"


def _pick_split(path: Path, split: str | None) -> str | None:
    splits = available_splits(path)
    if split is None:
        if len(splits) == 1:
            return splits[0]
        if "train" in splits:
            return "train"
        raise BadInput(f"{path}: holds several splits ({', '.join(map(str, splits))}); choose one with --split")
    if split in splits or (_is_coco_dir(path) and (path / f"{split}.json").is_file()):
        return split
    if f"{split}.split" in splits:
        return f"{split}.split"
    if splits == [None]:
        if split == "train":
            return None  # a set without splits is all train (carve val with split_dataset)
        raise BadInput(f"{path}: has no splits, so no {split!r} split; omit --split (or use train)")
    raise BadInput(f"{path}: no split {split!r} (found: {', '.join(str(s) for s in splits)})")


def _names(ds: DetectionDataset, classes) -> str:
    return ";".join(sorted(ds.classes[c] for c in classes)) or "(none)"


def _add_weak(ds: DetectionDataset, csv: Path | None, bases: list[Path], lm) -> None:
    """Add the weak images of a labels CSV (ids: their file names, or the next integers after the
    annotations' integer ids). An image the annotations already hold as weak must carry the same
    labels (synth writes both); one they hold with boxes keeps its boxes (with a warning)."""
    if csv is None or not csv.is_file():
        return
    from cyto_edge.train.data.weak import read_labels_csv

    def key(f) -> str:
        return os.path.normpath(os.path.abspath(f))

    known = {key(im.file): im for im in ds.images}
    # ids stay of one type (pycocotools sorts them): after integer ids, CSV images are numbered on
    int_ids = bool(ds.images) and all(isinstance(im.image_id, int) for im in ds.images)
    next_id = max((im.image_id for im in ds.images), default=0) + 1 if int_ids else None
    for rec in read_labels_csv(csv, bases, lm):
        old = known.get(key(rec.file))
        if old is None:
            if next_id is not None:
                rec.image_id, next_id = next_id, next_id + 1
            ds.images.append(rec)
        elif old.boxed:
            ds.warnings.append(f"{csv}: {rec.image_id}: image-level labels ignored, the image has boxes")
        elif old.classes_present != rec.classes_present:
            raise BadInput(f"{csv}: labels of {rec.image_id!r} ({_names(ds, rec.classes_present)}) differ from "
                           f"its image_labels in the annotations ({_names(ds, old.classes_present)}); make them agree")
    check_unique_ids(ds.images, f"{csv}")


def _load_coco(p: Path, split: str | None, lm) -> DetectionDataset:
    from cyto_edge.train.data.coco import read_coco

    jpath = p if p.is_file() else p / f"{split}.json"
    name = jpath.name[:-5]
    # images of train.json are in train/; of train.clean.json / train.split.json also in train/
    dirs = [jpath.parent / n for n in (name, name.split(".")[0]) if (jpath.parent / n).is_dir()]
    images_dir = dirs[0] if dirs else None
    ds = read_coco(jpath, images_dir, lm)
    bases = [b for b in (images_dir, jpath.parent) if b is not None]
    _add_weak(ds, jpath.parent / f"{name}_labels.csv", bases, lm)
    _not_empty(ds, jpath)
    return ds


def _not_empty(ds: DetectionDataset, source: Path) -> None:
    if not ds.images:
        raise BadInput(f"{source}: images: the set is empty; add images and annotations")


def _load_voc(p: Path, split: str | None, lm) -> DetectionDataset:
    from cyto_edge.train.data.voc import read_voc, read_voc_file, voc_layout

    warnings: list[str] = []
    if p.is_file():
        root, records = p.parent, [read_voc_file(p, [p.parent, p.parent.parent / "JPEGImages"], lm, warnings)]
    else:
        root, records = p, read_voc(p, split, lm, warnings)
    ds = DetectionDataset(root=root, classes=lm.classes, images=records, taxonomy=lm.taxonomy,
                          name=root.name, warnings=warnings)
    check_unique_ids(records, f"{root}")
    image_dirs = (voc_layout(root) or (root, [root]))[1]
    _add_weak(ds, _label_csvs(root).get(split), image_dirs, lm)
    _not_empty(ds, p)
    return ds


def _load_weak(p: Path, split: str | None, lm) -> DetectionDataset:
    from cyto_edge.train.data.weak import read_labels_csv

    csv = p if p.is_file() else _label_csvs(p)[split]
    root = csv.parent
    bases = [b for b in (root / split if split else None, root, root / "images") if b is not None]
    records = read_labels_csv(csv, bases, lm)
    check_unique_ids(records, f"{csv}")
    ds = DetectionDataset(root=root, classes=lm.classes, images=records, taxonomy=lm.taxonomy, name=csv.stem)
    _not_empty(ds, csv)
    return ds


def _load_cric(p: Path, lm, side_px: float) -> DetectionDataset:
    from cyto_edge.train.data.cric import read_cric

    csv = p if p.is_file() else p / "classifications.csv"
    warnings: list[str] = []
    records = read_cric(csv, lm, side_px, warnings)
    ds = DetectionDataset(root=csv.parent, classes=lm.classes, images=records, taxonomy=lm.taxonomy,
                          name=csv.parent.name, warnings=warnings)
    _not_empty(ds, csv)
    return ds


def load_detection(path: str | Path, split: str | None = None, mapping=None, *,
                   point_box_px: float | None = None, point_box_um: float | None = None,
                   um_per_px: float | None = None) -> DetectionDataset:
    """Read a detection dataset of any supported format (see the module docstring).

    split: "train", "test", "val" (val.json, else the val.split.json written by `data split`),
           "train.split", or None (the only split, or train). A set without splits is all "train". mapping: None (default taxonomy), a
           class-mapping file, a Taxonomy or a LabelMap. point_box_px / point_box_um: side of the square
           box around a CRIC nucleus (default 100 px; µm needs um_per_px). um_per_px: the images' scale
           when the annotations do not record it (overrides info.um_per_px).
    Raises BadInput (one line naming the file and field) for any problem found without decoding images.
    """
    p = Path(path)
    fmt = detect_format(p)
    if fmt in ("sipakmed", "folders"):
        raise BadInput(f"{p}: is a classification set ({fmt}), not a detection set")
    chosen = None if p.is_file() else _pick_split(p, split)
    if fmt == "cric":
        from cyto_edge.train.data.cric import point_box_px as side

        lm = load_label_map(mapping, default_ignore=CRIC_IGNORE if mapping is None else ())
        ds = _load_cric(p, lm, side(point_box_px, point_box_um, um_per_px))
    else:
        lm = load_label_map(mapping)
        ds = {"coco": _load_coco, "voc": _load_voc, "weak": _load_weak}[fmt](p, chosen, lm)
    if um_per_px is not None:
        if um_per_px <= 0:
            raise BadInput(f"--um-per-px must be positive, got {um_per_px:g}")
        ds.um_per_px = float(um_per_px)
    ds.name = ds.name if chosen is None else chosen
    if not ds.images:
        raise BadInput(f"{p}{'' if chosen is None else f' (split {chosen})'}: images: the set is empty; "
                       "add images and annotations")
    return ds


def load_classification(path: str | Path, mapping=None, source: str = "auto") -> ClassificationDataset:
    """Read a SIPaKMeD-layout or class-folder set. `source` (SIPaKMeD only): "cells" (full fields +
    cytoplasm boxes), "crops" (CROPPED/) or "auto" (cells when polygons exist)."""
    p = Path(path)
    if not p.is_dir():
        raise BadInput(f"{p}: a classification set is a directory (im_<Class>/ or <class>/ folders)")
    if source not in ("auto", "cells", "crops"):
        raise BadInput(f"source must be auto, cells or crops, got {source!r}")
    if cls_mod.is_sipakmed(p):
        ds = cls_mod.read_sipakmed(p, mapping, source)
    elif cls_mod.is_class_folders(p):
        ds = cls_mod.read_class_folders(p, mapping)
    else:
        raise BadInput(f"{p}: no classification set found; expected im_<Class>/ (SIPaKMeD) or <class>/ folders")
    if not ds.items:
        raise BadInput(f"{p}: items: the set is empty (no cells found)")
    return ds
