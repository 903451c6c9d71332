"""Replay of the images in a folder, in name order: `folder:///data/fields?fps=5&loop=0`.

Options (query or keyword): fps (replay rate; none: as fast as read), loop (0: once, 1: forever),
recursive (0/1). Unreadable files are skipped and counted in `dropped` (their names in
`stats()["unreadable"]`); images of another size are delivered with meta["size_changed"].
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import cv2

from cyto_edge.errors import BadInput
from cyto_edge.runtime.sources import Frame
from cyto_edge.runtime.sources.base import SourceBase, coerce, uri_options

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm", ".jp2"}


def natural_key(name: str) -> list:
    """`f2.png` before `f10.png` (text and numbers alternate, so keys always compare)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def folder_path(uri: str) -> Path:
    p = urlparse(uri)
    return Path(unquote(p.netloc + p.path)) if p.scheme == "folder" else Path(uri)


class FolderSource(SourceBase):
    """The images of a folder as a stream (a recorded slide, a test set)."""

    def __init__(self, uri: str, *, fps: float | None = None, loop: bool | None = None,
                 recursive: bool | None = None, timeout_s: float | None = None, reconnect: bool | None = None,
                 backoff_s: float | None = None, backoff_max_s: float | None = None):
        """timeout_s / reconnect / backoff_*: accepted like every source's, unused (files do not drop)."""
        super().__init__(uri)
        opts = uri_options(uri)
        self.fps = coerce("fps", opts.get("fps") if fps is None else fps, float) or None
        self.loop = bool(coerce("loop", opts.get("loop", 0) if loop is None else loop, bool))
        rec = bool(coerce("recursive", opts.get("recursive", 0) if recursive is None else recursive, bool))
        self.root = folder_path(uri)
        if not self.root.is_dir():
            raise BadInput(f"{uri}: no such folder")
        pattern = "**/*" if rec else "*"
        self.files = sorted((f for f in self.root.glob(pattern) if f.suffix.lower() in IMAGE_EXTS and f.is_file()),
                            key=lambda f: [natural_key(x) for x in f.relative_to(self.root).parts])
        if not self.files:
            raise BadInput(f"{uri}: no images in the folder ({', '.join(sorted(IMAGE_EXTS))})")
        self.unreadable: list[str] = []
        self._pos = 0
        self._next_t = 0.0
        self.state = "live"

    def read(self) -> Frame | None:
        while not self._closing.is_set():
            if self._pos >= len(self.files):
                if not self.loop or len(self.unreadable) >= len(self.files):
                    break
                self._pos = 0
            path = self.files[self._pos]
            self._pos += 1
            self._pace()
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            frame = self._emit(img, path=str(path), name=path.name, position=self._pos - 1)
            if frame is not None:
                return frame
            # counted in `dropped` by _emit
            self.last_error = f"{path.name}: {'unreadable image' if img is None else self.last_error}"
            if str(path) not in self.unreadable:
                self.unreadable.append(str(path))
        self.state = "ended"
        return None

    def _pace(self) -> None:
        if not self.fps:
            return
        now = time.monotonic()
        if self._next_t > now:
            self._closing.wait(self._next_t - now)
        self._next_t = max(now, self._next_t) + 1.0 / self.fps

    def __len__(self) -> int:
        return len(self.files)

    def stats(self) -> dict:
        s = super().stats()
        s.update(files=len(self.files), unreadable=list(self.unreadable))
        return s
