"""What every camera source shares: conversion to (H, W, 3) uint8 BGR, state, counters, URI options.

States (`source.state`): "connecting" (opening), "live" (frames flow), "lost" (a live source failed and
is reconnecting with back-off), "ended" (end of a file / folder, or closed). Counters: `frames` (delivered),
`dropped` (empty, corrupt or unconvertible frames skipped), `reconnects`, `size_changes`.
"""
from __future__ import annotations

import abc
import threading
import time
from typing import Callable
from urllib.parse import parse_qsl, urlparse

import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.runtime.sources import Frame

STATES = ("connecting", "live", "lost", "ended")
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def to_bgr8(img: np.ndarray | None, bit_depth: int = 8) -> tuple[np.ndarray, int]:
    """Any camera / file frame -> ((H, W, 3) uint8 BGR, bit depth used).

    Grayscale (H, W) or (H, W, 1) -> BGR; BGRA -> BGR; 16-bit -> 8-bit by the bit depth actually used
    (the larger of `bit_depth` and the bits needed by this frame's maximum: 12-bit data in a 16-bit
    container keeps its full range); float in [0, 1] -> x255. Raises ValueError naming what is wrong.
    """
    if img is None or not hasattr(img, "shape") or img.size == 0:
        raise ValueError("empty frame")
    a = img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"unsupported frame shape {tuple(img.shape)} (need HxW, HxWx3 or HxWx4)")
    if a.dtype == np.uint16:
        bit_depth = max(bit_depth, int(a.max()).bit_length(), 8)
        a = (a >> (bit_depth - 8)).astype(np.uint8)
    elif a.dtype in (np.float32, np.float64):
        scale = 255.0 if float(np.nanmax(a)) <= 1.0 else 1.0
        a = np.clip(np.nan_to_num(a) * scale, 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {a.dtype} (need uint8, uint16 or float)")
    if a.ndim == 2:
        import cv2

        a = cv2.cvtColor(a, cv2.COLOR_GRAY2BGR)
    elif a.shape[2] == 4:
        import cv2

        a = cv2.cvtColor(a, cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(a), bit_depth


def uri_options(uri: str) -> dict[str, str]:
    """`scheme://target?width=2028&fps=5` -> {"width": "2028", "fps": "5"}."""
    return dict(parse_qsl(urlparse(uri).query, keep_blank_values=True))


def coerce(name: str, value, kind: type):
    """A URI query string (or a keyword) -> int / float / bool, or BadInput naming the option."""
    if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            s = str(value).strip().lower()
            if s in TRUE or s in FALSE:
                return s in TRUE
            raise ValueError
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise BadInput(f"source option {name}={value!r}: must be {kind.__name__}") from None


class SourceBase(abc.ABC):
    """State, counters, frame conversion and context management for the concrete sources."""

    uri: str = ""
    live: bool = False  # a camera or a stream (reconnects), as opposed to a file or a folder

    def __init__(self, uri: str):
        self.uri = uri
        self.state = "connecting"
        self.frames = 0          # frames delivered
        self.dropped = 0         # empty / corrupt / unconvertible frames skipped
        self.reconnects = 0
        self.size_changes = 0
        self.last_error = ""     # why the last frame was dropped or the last connection failed
        self._bit_depth = 8
        self._size: tuple[int, int] | None = None  # (W, H) of the last frame delivered
        self._closing = threading.Event()

    # -- frames ------------------------------------------------------------------------------
    def _emit(self, img: np.ndarray | None, **meta) -> Frame | None:
        """Convert and wrap one raw frame; None (counted in `dropped`) when it is empty or unusable."""
        try:
            bgr, self._bit_depth = to_bgr8(img, self._bit_depth)
        except ValueError as e:
            self.dropped += 1
            self.last_error = str(e)
            return None
        size = (bgr.shape[1], bgr.shape[0])
        if self._size is not None and size != self._size:
            self.size_changes += 1
            meta["size_changed"] = {"from": list(self._size), "to": list(size)}
        self._size = size
        frame = Frame(image=bgr, index=self.frames, timestamp=time.monotonic(), meta=meta)
        self.frames += 1
        self.state = "live"
        return frame

    # -- reconnect -----------------------------------------------------------------------------
    def _reconnect_loop(self, open_once: Callable[[], bool], backoff_s: float, backoff_max_s: float,
                        give_up_s: float | None) -> bool:
        """State "lost", then `open_once()` with exponential back-off until it succeeds (True), the
        source is closed or `give_up_s` passes (False). The waits end at once when the source closes."""
        self.state = "lost"
        delay, t0 = max(backoff_s, 1e-3), time.monotonic()
        while not self._closing.is_set():
            if give_up_s is not None and time.monotonic() - t0 > give_up_s:
                return False
            if self._closing.wait(delay):
                return False
            try:
                ok = open_once()
            except Exception as e:  # noqa: BLE001 - a failed attempt is retried; the reason is kept
                ok, self.last_error = False, f"{type(e).__name__}: {e}"
            if ok:
                self.reconnects += 1
                self.state = "live"
                return True
            delay = min(delay * 2.0, backoff_max_s)
        return False

    # -- bookkeeping -------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"uri": self.uri, "state": self.state, "live": self.live, "frames": self.frames,
                "dropped": self.dropped, "reconnects": self.reconnects, "size_changes": self.size_changes,
                "last_error": self.last_error}

    def close(self) -> None:
        self._closing.set()
        self.state = "ended"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        while True:
            f = self.read()
            if f is None:
                return
            yield f

    @abc.abstractmethod
    def read(self) -> Frame | None:
        """The next frame, or None when the source has ended (a file or folder) or was closed."""
