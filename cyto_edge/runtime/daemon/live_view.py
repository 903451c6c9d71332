"""The newest picture for the live view (MJPEG stream and snapshots): overlays, focus bar, status frames.

`PreviewBuffer.publish(img)` keeps only the newest (h, w, 3) uint8 BGR image; `jpeg()` encodes it at most
once per published image, whatever the number of viewers. When the camera is lost or the engine is
down, a status frame says so in the stream itself.
"""
from __future__ import annotations

import threading
import time

import cv2
import numpy as np

from cyto_edge import DISCLAIMER

FONT = cv2.FONT_HERSHEY_SIMPLEX


class PreviewBuffer:
    def __init__(self, quality: int = 80):
        self.quality = int(quality)
        self.version = 0
        self.published_at = 0.0          # time.monotonic() of the newest image
        self._img: np.ndarray | None = None
        self._jpeg: tuple[int, bytes] = (-1, b"")
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()

    def publish(self, img: np.ndarray) -> None:
        with self._lock:
            self._img = img
            self.version += 1
            self.published_at = time.monotonic()

    def jpeg(self) -> tuple[int, bytes]:
        """(version, JPEG bytes) of the newest image; (0, b"") before the first one."""
        with self._lock:
            img, version = self._img, self.version
        if img is None:
            return 0, b""
        with self._encode_lock:
            if self._jpeg[0] != version:
                ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
                if ok:
                    self._jpeg = (version, buf.tobytes())
            return self._jpeg


def draw_focus_bar(img: np.ndarray, focus: float | None) -> np.ndarray:
    """A vertical bar at the right edge, filled to `focus` (1.0 = the recent best), drawn in place."""
    if focus is None or not np.isfinite(focus):
        return img
    H, W = img.shape[:2]
    bw, top, bottom = max(8, W // 80), int(H * 0.12), int(H * 0.88)
    x0 = W - bw - 8
    f = float(np.clip(focus, 0.0, 1.0))
    cv2.rectangle(img, (x0, top), (x0 + bw, bottom), (40, 40, 40), -1)
    level = int(bottom - (bottom - top) * f)
    colour = (80, 200, 80) if f >= 0.85 else (0, 200, 255) if f >= 0.5 else (60, 60, 230)
    cv2.rectangle(img, (x0, level), (x0 + bw, bottom), colour, -1)
    cv2.rectangle(img, (x0, top), (x0 + bw, bottom), (230, 230, 230), 1)
    return img


def status_frame(title: str, detail: str = "", size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """(h, w, 3) uint8 BGR: a dark frame saying what is wrong (camera lost, engine error, waiting)."""
    w, h = size
    img = np.full((h, w, 3), 32, np.uint8)
    fs = max(0.5, w / 900)
    cv2.putText(img, title, (20, h // 2 - 10), FONT, fs * 1.4, (60, 160, 255), 2, cv2.LINE_AA)
    y = h // 2 + 30
    for line in _wrap(detail, max(20, int(w / (14 * fs))))[:4]:
        cv2.putText(img, line, (20, y), FONT, fs * 0.7, (220, 220, 220), 1, cv2.LINE_AA)
        y += int(28 * fs)
    cv2.putText(img, time.strftime("%H:%M:%S"), (20, 30), FONT, fs * 0.7, (160, 160, 160), 1, cv2.LINE_AA)
    cv2.putText(img, DISCLAIMER, (20, h - 12), FONT, fs * 0.6, (200, 200, 200), 1, cv2.LINE_AA)
    return img


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for wd in words:
        if len(cur) + len(wd) + 1 > width and cur:
            lines.append(cur)
            cur = wd
        else:
            cur = f"{cur} {wd}".strip()
    return lines + ([cur] if cur else [])
