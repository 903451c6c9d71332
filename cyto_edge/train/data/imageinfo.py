"""Image files: their size from the file header (no decoding), and where an annotation's name points."""
from __future__ import annotations

import os
import struct
from pathlib import Path

from cyto_edge.errors import BadInput

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS


def _png_size(head: bytes) -> tuple[int, int] | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return int(w), int(h)
    return None


def _bmp_size(head: bytes) -> tuple[int, int] | None:
    if head[:2] == b"BM" and len(head) >= 26:
        hdr = struct.unpack("<I", head[14:18])[0]
        if hdr == 12:  # OS/2 BITMAPCOREHEADER
            w, h = struct.unpack("<HH", head[18:22])
        else:
            w, h = struct.unpack("<ii", head[18:26])
        return int(w), abs(int(h))
    return None


def _jpeg_size(f) -> tuple[int, int] | None:
    f.seek(0)
    if f.read(2) != b"\xff\xd8":
        return None
    while True:
        b = f.read(1)
        while b and b != b"\xff":
            b = f.read(1)
        while b == b"\xff":
            b = f.read(1)
        if not b:
            return None
        marker = b[0]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        seg = f.read(2)
        if len(seg) < 2:
            return None
        length = struct.unpack(">H", seg)[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            data = f.read(5)
            if len(data) < 5:
                return None
            h, w = struct.unpack(">HH", data[1:5])
            return int(w), int(h)
        f.seek(length - 2, 1)


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) read from a PNG, JPEG or BMP header; None for other formats or a bad header."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            return _png_size(head) or _bmp_size(head) or (_jpeg_size(f) if head[:2] == b"\xff\xd8" else None)
    except (OSError, struct.error):
        return None


def image_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) of an image file: the header when it has one, else a decode. `where` names the
    annotation that points at the file, for the error message."""
    size = header_size(path)
    if size is not None and size[0] > 0 and size[1] > 0:
        return size
    if not path.is_file():
        raise BadInput(f"{where}: image {path} does not exist; fix the file name or add the image")
    import cv2

    im = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if im is None:
        raise BadInput(f"{where}: image {path} cannot be read (not an image or corrupt); replace or remove it")
    return int(im.shape[1]), int(im.shape[0])


def resolve(name: str, bases: list[Path], where: str) -> Path:
    """The image an annotation names: an absolute path, or `name` relative to the first base that has
    it (e.g. the split folder, then the annotation file's folder). Missing -> BadInput naming `where`."""
    name = str(name).replace("\\", "/")
    cands = [name] if os.path.isabs(name) else [os.path.join(b, name) for b in bases]
    for c in cands:
        if os.path.isfile(c):
            return Path(c)
    tried = ", ".join(os.path.dirname(c) for c in cands)
    raise BadInput(f"{where}: image {name!r} not found (looked in {tried}); fix the file name or add the image")
