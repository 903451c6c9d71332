"""The image store: full-resolution FOV JPEGs and cell crops under `<storage.root>/images/`.

Layout: `images/s000003/f000041-1a2b3c.jpg` (a FOV of session 3) and `...-c0.jpg`, `-c1.jpg` (its crops).
Names carry session and FOV numbers and a random suffix, never a slide id. Durability: each file is
written to a hidden temporary name, fsynced, renamed into place, and the directory is fsynced once per
FOV, all BEFORE the database row that names the files is committed (store.py). A crash leaves at worst
temporary files or files no row names; `Store.recover()` removes both at the next start.

Disk full: `DiskFull` is raised before writing when free space is below the reserve, or when the OS says
so (ENOSPC, EDQUOT, EFBIG) while writing; the caller keeps the result and stores it without images.

Test hook: $CYTO_EDGE_TEST_IMAGE_WRITE_DELAY_S pauses in the middle of every image write (after half the
bytes), so that a fault test can kill the daemon while an image is half written.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

DELAY_ENV = "CYTO_EDGE_TEST_IMAGE_WRITE_DELAY_S"
MIN_FREE_ENV = "CYTO_EDGE_MIN_FREE_MB"
MIN_FREE_MB = 64                       # below this much free space no image is written
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
NAME_RE = re.compile(r"^s\d{6,}/f\d{6,}-[0-9a-f]{6}(-c\d{1,3})?\.jpg$")  # the only names ever served
CROP_MARGIN = 0.25                     # crops extend the box by this fraction of its side, each way
CROP_MIN_SIDE = 32                     # px; tiny boxes get context


class DiskFull(OSError):
    """No space for images: results are kept, images are not written."""


@dataclass
class WrittenFile:
    rel: str          # path relative to the images root (NAME_RE)
    nbytes: int


def min_free_bytes() -> int:
    try:
        mb = float(os.environ.get(MIN_FREE_ENV, MIN_FREE_MB))
    except ValueError:
        mb = MIN_FREE_MB
    return int(mb * 1024 * 1024)


def encode_jpeg(img_bgr: np.ndarray, quality: int) -> bytes:
    """(H, W, 3) uint8 BGR -> JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", img_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def crop_box(shape: tuple[int, ...], box, margin: float = CROP_MARGIN, min_side: int = CROP_MIN_SIDE):
    """xyxy frame px -> integer (x0, y0, x1, y1) with context, clipped to the frame; None when empty."""
    H, W = shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite([x0, y0, x1, y1])):
        return None
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w = max(x1 - x0, 1.0) * (1 + 2 * margin)
    h = max(y1 - y0, 1.0) * (1 + 2 * margin)
    w, h = max(w, min_side), max(h, min_side)
    a = (int(max(0, np.floor(cx - w / 2))), int(max(0, np.floor(cy - h / 2))))
    b = (int(min(W, np.ceil(cx + w / 2))), int(min(H, np.ceil(cy + h / 2))))
    return None if b[0] <= a[0] or b[1] <= a[1] else (a[0], a[1], b[0], b[1])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ImageStore:
    """Writes and resolves image files under `root` (the store's images directory)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- names and lookup ---------------------------------------------------------------------------
    def new_names(self, session_id: int, seq: int, n_crops: int) -> tuple[str, list[str]]:
        stem = f"s{session_id:06d}/f{seq:06d}-{secrets.token_hex(3)}"
        return stem + ".jpg", [f"{stem}-c{i}.jpg" for i in range(n_crops)]

    def resolve(self, rel: str) -> Path | None:
        """The file for a stored name, or None: names outside NAME_RE or outside the root are refused."""
        if not isinstance(rel, str) or not NAME_RE.match(rel):
            return None
        p = (self.root / rel).resolve()
        root = self.root.resolve()
        if root not in p.parents or not p.is_file():
            return None
        return p

    # -- writing --------------------------------------------------------------------------------------
    def check_space(self, need: int = 0) -> None:
        free = shutil.disk_usage(self.root).free
        if free - need < min_free_bytes():
            raise DiskFull(errno.ENOSPC, f"{free // (1024 * 1024)} MB free, below the "
                                         f"{min_free_bytes() // (1024 * 1024)} MB reserve")

    def write_all(self, files: list[tuple[str, bytes]]) -> list[WrittenFile]:
        """Write each (name, data) durably: temp file, fsync, rename; then fsync the directories.
        On any failure the files of this call are removed and the error re-raised (DiskFull when the
        disk is full)."""
        self.check_space(sum(len(d) for _, d in files))
        done: list[Path] = []
        dirs: set[Path] = set()
        try:
            for rel, data in files:
                path = self.root / rel
                if path.parent not in dirs:
                    self._mkdir(path.parent)
                    dirs.add(path.parent)
                self._write_one(path, data)
                done.append(path)
            for d in dirs:
                fsync_dir(d)
        except OSError as e:
            for p in done:
                p.unlink(missing_ok=True)
            if e.errno in FULL_ERRNOS and not isinstance(e, DiskFull):
                raise DiskFull(e.errno, f"disk full while writing images ({os.strerror(e.errno)})") from None
            raise
        return [WrittenFile(rel, len(data)) for rel, data in files]

    def _mkdir(self, d: Path) -> None:
        if not d.is_dir():
            d.mkdir(parents=True, exist_ok=True)
            fsync_dir(d.parent)

    def _write_one(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            delay = float(os.environ.get(DELAY_ENV, "0") or 0)
            half = len(data) // 2 if delay > 0 else len(data)
            _write_fully(fd, data[:half])
            if delay > 0:
                time.sleep(delay)
                _write_fully(fd, data[half:])
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, path)

    # -- deleting and sweeping ------------------------------------------------------------------------
    def delete(self, rels: list[str]) -> int:
        """Remove stored files (names already released by the database); returns bytes freed."""
        freed, dirs = 0, set()
        for rel in rels:
            p = self.resolve(rel)
            if p is not None:
                freed += p.stat().st_size
                p.unlink(missing_ok=True)
                dirs.add(p.parent)
        for d in dirs:
            fsync_dir(d)
        return freed

    def sweep(self, referenced: set[str]) -> dict:
        """Remove temporary files and files no database row names (left by a crash between the image
        write and the commit). Only at start-up, before anything writes."""
        temp = orphans = 0
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for f in d.iterdir():
                rel = f"{d.name}/{f.name}"
                if f.name.startswith(".") and f.name.endswith(".tmp"):
                    f.unlink(missing_ok=True)
                    temp += 1
                elif f.is_file() and rel not in referenced:
                    f.unlink(missing_ok=True)
                    orphans += 1
            if not any(d.iterdir()):
                d.rmdir()
        return {"removed_temp": temp, "removed_orphans": orphans}


def _write_fully(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
