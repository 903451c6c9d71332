"""Camera sources, chosen by URI scheme from a registry (one module per kind).

    file:///path/video.mp4 | file:///path/image.png   a video or an image (opencv)
    v4l2:///dev/video0 | 0                           a USB / V4L2 camera by device path or index (opencv)
    rtsp://host/stream | http://host/video.mjpg      a network stream (opencv)
    gst://PIPELINE                                   a GStreamer pipeline, e.g. nvarguscamerasrc (opencv)
    picam2://0                                       a Raspberry Pi camera (picamera2)
    folder:///path/dir                               replay of the images in a folder
    synth://?seed=0&fps=30                           a moving stage over the synthetic slide

Contract: a Source is a context manager; `read()` returns the next `Frame` or None at the end of the
stream; `close()` releases the device. Images are HxWx3 uint8 in BGR order (OpenCV's); sources convert
grayscale / 16-bit input or refuse it with a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import urlparse

import numpy as np

from cyto_edge.registry import Registry


@dataclass
class Frame:
    image: np.ndarray             # (H, W, 3) uint8 BGR
    index: int                    # frame counter of the source, from 0
    timestamp: float              # time.monotonic() at capture
    meta: dict = field(default_factory=dict)  # source-specific: synth stage position / stop id, file position…


@runtime_checkable
class Source(Protocol):
    uri: str

    def read(self) -> Frame | None: ...

    def close(self) -> None: ...

    def __enter__(self): ...

    def __exit__(self, *exc): ...


SOURCES: Registry = Registry("camera source", {
    "file": "cyto_edge.runtime.sources.opencv:OpenCVSource",
    "v4l2": "cyto_edge.runtime.sources.opencv:OpenCVSource",
    "rtsp": "cyto_edge.runtime.sources.opencv:OpenCVSource",
    "http": "cyto_edge.runtime.sources.opencv:OpenCVSource",
    "https": "cyto_edge.runtime.sources.opencv:OpenCVSource",
    "gst": "cyto_edge.runtime.sources.opencv:OpenCVSource",
    "picam2": "cyto_edge.runtime.sources.picamera2:Picamera2Source",
    "folder": "cyto_edge.runtime.sources.folder:FolderSource",
    "synth": "cyto_edge.runtime.sources.synthetic:SyntheticStageSource",
})


def scheme_of(uri: str) -> str:
    if uri.isdigit():
        return "v4l2"
    s = urlparse(uri).scheme
    return s or "file"


def open_source(uri: str, **options) -> Source:
    """Open a source by URI; `options` are passed to the source class (e.g. fps, timeout_s, width, height)."""
    cls = SOURCES.get(scheme_of(uri))
    return cls(uri, **options)
