"""Pascal VOC XML: `<root>/Annotations/*.xml` with images in `<root>/JPEGImages/`, or xml files beside
their images. `ImageSets/Main/<split>.txt`, when present, lists the ids of a split.

VOC coordinates are 1-based pixel indices: a box (xmin, ymin, xmax, ymax) covers pixels xmin..xmax, so
in continuous xyxy pixels it is (xmin - 1, ymin - 1, xmax, ymax) (the convention detectron2 follows).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from cyto_edge.errors import BadInput
from cyto_edge.train.data.common import BoxCollector
from cyto_edge.train.data.imageinfo import IMAGE_EXTS, image_size, resolve
from cyto_edge.train.data.labels import IGNORED, LabelMap
from cyto_edge.train.data.types import ImageRecord


def parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        line, col = e.position
        raise BadInput(f"{path}: malformed XML at line {line} column {col + 1}: "
                       f"{str(e).split(':')[0]}") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from None


def _number(obj: ET.Element, tag: str, where: str) -> float:
    el = obj.find(tag)
    if el is None or el.text is None or not el.text.strip():
        raise BadInput(f"{where}.{tag}: missing")
    try:
        return float(el.text)
    except ValueError:
        raise BadInput(f"{where}.{tag}: must be a number, got {el.text.strip()!r}") from None


def _image_file(root: ET.Element, xml: Path, image_dirs: list[Path]) -> Path:
    name = (root.findtext("filename") or "").strip()
    where = f"{xml}: annotation.filename"
    if name:
        return resolve(name, image_dirs, where)
    for d in image_dirs:
        for ext in IMAGE_EXTS:
            if (d / (xml.stem + ext)).is_file():
                return d / (xml.stem + ext)
    raise BadInput(f"{where}: missing, and no image named {xml.stem}.* beside the annotation")


def _size(root: ET.Element, xml: Path, file: Path) -> tuple[int, int]:
    size = root.find("size")
    if size is None or size.find("width") is None or size.find("height") is None:
        return image_size(file, f"{xml}: annotation.filename")
    w = _number(size, "width", f"{xml}: size")
    h = _number(size, "height", f"{xml}: size")
    if w <= 0 or h <= 0:  # some tools write 0 when they did not know; read the image then
        return image_size(file, f"{xml}: annotation.filename")
    return int(w), int(h)


def read_voc_file(xml: Path, image_dirs: list[Path], lm: LabelMap, warnings: list[str]) -> ImageRecord:
    root = parse_xml(xml)
    if root.tag != "annotation":
        raise BadInput(f"{xml}: not a VOC annotation (root element <{root.tag}>, expected <annotation>)")
    file = _image_file(root, xml, image_dirs)
    w, h = _size(root, xml, file)
    col = BoxCollector(w, h, warnings, where=lambda i: f"{xml}: object[{i}].bndbox")
    for i, obj in enumerate(root.findall("object")):
        where = f"{xml}: object[{i}]"
        name = (obj.findtext("name") or "").strip()
        idx = lm.index(name)
        if idx is None:
            raise BadInput(f"{where}.name: unknown category {name!r}; {lm.unknown_hint()}")
        if idx == IGNORED:
            continue
        bb = obj.find("bndbox")
        if bb is None:
            raise BadInput(f"{where}.bndbox: missing")
        b = [_number(bb, t, f"{where}.bndbox") for t in ("xmin", "ymin", "xmax", "ymax")]
        col.add((b[0] - 1, b[1] - 1, b[2], b[3]), idx, i)
    boxes, labels = col.arrays()
    return ImageRecord(file=file, width=w, height=h, image_id=xml.stem, boxes=boxes, labels=labels)


def voc_layout(root: Path) -> tuple[Path, list[Path]] | None:
    """(annotation folder, image folders) when `root` holds a VOC set, else None."""
    if (root / "Annotations").is_dir():
        return root / "Annotations", [root / "JPEGImages", root / "images", root / "Annotations", root]
    if any(root.glob("*.xml")):
        return root, [root, root / "images"]
    return None


def read_voc(root: Path, split: str | None, lm: LabelMap, warnings: list[str]) -> list[ImageRecord]:
    ann_dir, image_dirs = voc_layout(root) or (root, [root])
    xmls = sorted(ann_dir.glob("*.xml"))
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if split is not None and listing.is_file():
        ids = [ln.split()[0] for ln in listing.read_text().splitlines() if ln.strip()]
        by_stem = {x.stem: x for x in xmls}
        missing = [i for i in ids if i not in by_stem]
        if missing:
            raise BadInput(f"{listing}: id {missing[0]!r} has no {ann_dir.name}/{missing[0]}.xml")
        xmls = [by_stem[i] for i in ids]
    return [read_voc_file(x, image_dirs, lm, warnings) for x in xmls]
