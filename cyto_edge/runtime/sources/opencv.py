"""OpenCV sources: files (video or one image), USB / V4L2 cameras, RTSP / HTTP streams, GStreamer pipelines.

    file:///data/slide.mp4   file://relative/clip.avi   /data/field.png   (a video or a single image)
    v4l2:///dev/video0   v4l2://0   0                  a USB / V4L2 camera (query: ?width=1920&height=1080&fps=30)
    rtsp://host:8554/stream   http://host/video.mjpg   a network stream
    gst://nvarguscamerasrc ! ... ! appsink             a GStreamer pipeline (Jetson CSI cameras)

Live sources (cameras, streams) reconnect with exponential back-off and report `state`; a source that
does not open within `timeout_s` is a BadInput naming the URI. Files end; a corrupt frame is skipped and
counted, a truncated file ends early (`stats()["truncated"]`). Every frame is (H, W, 3) uint8 BGR.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import cv2
import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.runtime.sources import Frame
from cyto_edge.runtime.sources.base import SourceBase, coerce, to_bgr8, uri_options

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm", ".jp2"}
APPSINK = "videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false"
FAIL_LIMIT = 3  # consecutive failed reads before a live source counts as lost


def gstreamer_available() -> bool:
    """Whether this OpenCV build has the GStreamer video backend (`GStreamer: YES`)."""
    m = re.search(r"^\s*GStreamer:\s*(\S+)", cv2.getBuildInformation(), re.MULTILINE)
    return bool(m and m.group(1).upper().startswith("YES"))


def gstreamer_missing_message(uri: str) -> str:
    return (f"{uri}: this OpenCV ({cv2.__version__}, {Path(cv2.__file__).parent}) was built without "
            "GStreamer, which gst:// needs. On a Jetson the system OpenCV from JetPack has it: a pip "
            "opencv-python(-headless) in the venv shadows it, so `pip uninstall opencv-python "
            "opencv-python-headless` and create the venv with --system-site-packages")


@dataclass
class Target:
    kind: str               # file | image | v4l2 | stream | gst
    target: str | int       # path, device index or path, URL or pipeline
    api: int                # cv2.CAP_* backend


def parse_uri(uri: str) -> Target:
    """Source URI -> what to open with which OpenCV backend (see the module docstring)."""
    uri = uri.strip()
    if uri.isdigit():
        return Target("v4l2", int(uri), _v4l2_api())
    if uri.startswith("gst://"):
        pipe = uri[len("gst://"):].strip()
        if not pipe:
            raise BadInput("gst://: empty GStreamer pipeline")
        if "appsink" not in pipe:
            pipe = f"{pipe} ! {APPSINK}"
        return Target("gst", pipe, cv2.CAP_GSTREAMER)
    p = urlparse(uri)
    scheme = p.scheme.lower()
    if scheme in ("rtsp", "rtsps", "http", "https", "rtmp", "udp", "tcp"):
        return Target("stream", uri, cv2.CAP_FFMPEG)
    if scheme == "v4l2":
        dev = unquote(p.netloc + p.path)
        return Target("v4l2", int(dev) if dev.isdigit() else dev, _v4l2_api())
    if scheme in ("file", "") or len(scheme) == 1:  # "" or a Windows drive letter: a plain path
        path = unquote(p.netloc + p.path) if scheme == "file" else uri
        kind = "image" if Path(path).suffix.lower() in IMAGE_EXTS else "file"
        return Target(kind, path, cv2.CAP_ANY)
    raise BadInput(f"{uri}: not an OpenCV source (file://, v4l2://, rtsp://, http://, gst://)")


def _v4l2_api() -> int:
    return cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY


class OpenCVSource(SourceBase):
    """A video file, an image, a camera or a stream read through cv2.VideoCapture."""

    def __init__(self, uri: str, *, width: int | None = None, height: int | None = None,
                 fps: float | None = None, timeout_s: float = 10.0, fourcc: str | None = None,
                 lock_exposure: bool = False, exposure: float | None = None,
                 lock_white_balance: bool = False, wb_temperature: float | None = None,
                 live: bool | None = None, realtime: bool = False, loop: bool = False,
                 reconnect: bool = True, backoff_s: float = 0.5, backoff_max_s: float = 10.0,
                 reconnect_timeout_s: float | None = None, max_bad_frames: int = 25):
        super().__init__(uri)
        self.t = parse_uri(uri)
        opts = uri_options(uri) if self.t.kind == "v4l2" else {}
        g = lambda k, v, typ: coerce(k, opts.get(k, v) if v is None else v, typ)  # noqa: E731
        self.width, self.height, self.fps = g("width", width, int), g("height", height, int), g("fps", fps, float)
        self.fourcc = opts.get("fourcc", fourcc)
        self.lock_exposure, self.exposure = bool(lock_exposure), exposure
        self.lock_white_balance, self.wb_temperature = bool(lock_white_balance), wb_temperature
        self.timeout_s = float(timeout_s)
        self.live = self.t.kind in ("v4l2", "stream", "gst") if live is None else bool(live)
        self.realtime, self.loop, self.reconnect_enabled = bool(realtime), bool(loop), bool(reconnect)
        self.backoff_s, self.backoff_max_s, self.reconnect_timeout_s = backoff_s, backoff_max_s, reconnect_timeout_s
        self.max_bad_frames = int(max_bad_frames)
        self.controls: dict[str, bool] = {}   # camera property -> whether the backend accepted it
        self.frame_count = 0                  # frames a video file says it holds (0: unknown)
        self._lock = threading.Lock()         # held around every VideoCapture call
        self._cap: cv2.VideoCapture | None = None
        self._pending: np.ndarray | None = None  # first frame read while opening
        self._image: np.ndarray | None = None
        self._next_t = 0.0
        self._failed = 0                      # failed reads in a row inside a file
        self._open_first()

    # -- opening -------------------------------------------------------------------------------
    def _open_first(self) -> None:
        if self.t.kind == "gst" and not gstreamer_available():
            raise BadInput(gstreamer_missing_message(self.uri))
        if self.t.kind in ("file", "image"):
            path = Path(self.t.target)
            if not path.is_file():
                raise BadInput(f"{self.uri}: no such file")
            if path.stat().st_size == 0:
                raise BadInput(f"{self.uri}: empty file")
        if self.t.kind == "image":
            return self._open_image(Path(self.t.target))
        if not self.live:
            if not self._open_once(self.timeout_s):
                raise BadInput(f"{self.uri}: OpenCV cannot decode this file ({self.last_error}); it may "
                               "be truncated, corrupt or in a codec this OpenCV lacks")
            self.frame_count = max(int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0)
            return
        deadline = time.monotonic() + self.timeout_s
        delay = min(self.backoff_s, 0.5)
        while not self._open_once(max(deadline - time.monotonic(), 0.1)):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing.wait(min(delay, remaining)):
                raise BadInput(f"{self.uri}: did not open within {self.timeout_s:g} s ({self.last_error}); "
                               f"{self._hint()}")
            delay = min(delay * 2, self.backoff_max_s)
        self.state = "live"

    def _hint(self) -> str:
        return {"v4l2": "check the device exists (ls /dev/video*), is connected and not used by another program",
                "stream": "check the address, the network and that the stream is running",
                "gst": "test the pipeline with gst-launch-1.0 (nvarguscamerasrc needs the nvargus-daemon)",
                }.get(self.t.kind, "check the path")

    def _open_image(self, path: Path) -> None:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # keeps 16-bit and grayscale as they are
        if img is None:
            raise BadInput(f"{self.uri}: OpenCV cannot read this image (corrupt or unsupported format)")
        try:
            self._image, self._bit_depth = to_bgr8(img)
        except ValueError as e:
            raise BadInput(f"{self.uri}: {e}") from None
        self.frame_count = 1

    def _open_once(self, timeout: float) -> bool:
        """Open the capture and read its first frame within `timeout` seconds (in a helper thread, so
        that a backend that hangs cannot block us). True on success: `_cap` and `_pending` are set."""
        box: dict = {}
        done = threading.Event()

        def work():
            cap = None
            try:
                ms = int(max(timeout, 0.1) * 1000)
                params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
                cap = (cv2.VideoCapture(self.t.target, self.t.api, params) if self.t.api == cv2.CAP_FFMPEG
                       else cv2.VideoCapture(self.t.target, self.t.api))
                if not cap.isOpened():
                    box["error"] = "the backend could not open it"
                    return
                if self.live:
                    self._apply_controls(cap)
                ok, img = cap.read()
                if not ok or img is None:
                    box["error"] = "opened but delivered no frame"
                    return
                box["cap"], box["img"], cap = cap, img, None
            except cv2.error as e:
                box["error"] = str(e).strip().splitlines()[-1]
            finally:
                if cap is not None:
                    cap.release()
                done.set()
                if box.get("abandoned") and "cap" in box:
                    box["cap"].release()

        threading.Thread(target=work, daemon=True, name="opencv-open").start()
        if not done.wait(timeout + 1.0):
            box["abandoned"] = True
            self.last_error = f"no answer within {timeout:g} s"
            return False
        if "cap" not in box:
            self.last_error = box.get("error", "unknown error")
            return False
        with self._lock:
            self._cap, self._pending = box["cap"], box["img"]
        return True

    def _apply_controls(self, cap: cv2.VideoCapture) -> None:
        """Resolution, rate and exposure / white-balance locks, where the backend allows them."""
        v4l2 = self.t.api == cv2.CAP_V4L2
        want: list[tuple[str, int, float]] = []
        if self.fourcc:
            want.append(("fourcc", cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.fourcc[:4])))
        for name, prop, val in (("width", cv2.CAP_PROP_FRAME_WIDTH, self.width),
                                ("height", cv2.CAP_PROP_FRAME_HEIGHT, self.height),
                                ("fps", cv2.CAP_PROP_FPS, self.fps)):
            if val:
                want.append((name, prop, val))
        want.append(("buffersize", cv2.CAP_PROP_BUFFERSIZE, 1))  # newest frame, not a driver backlog
        if self.lock_exposure:  # V4L2: 1 = manual, 3 = auto; DirectShow / MSMF: 0.25 = manual
            want.append(("auto_exposure", cv2.CAP_PROP_AUTO_EXPOSURE, 1 if v4l2 else 0.25))
            if self.exposure is not None:
                want.append(("exposure", cv2.CAP_PROP_EXPOSURE, float(self.exposure)))
        if self.lock_white_balance:
            want.append(("auto_wb", cv2.CAP_PROP_AUTO_WB, 0))
            if self.wb_temperature is not None:
                want.append(("wb_temperature", cv2.CAP_PROP_WB_TEMPERATURE, float(self.wb_temperature)))
        for name, prop, val in want:
            self.controls[name] = bool(cap.set(prop, val))
        refused = [n for n, ok in self.controls.items() if not ok and n != "buffersize"]
        if refused:
            log.warning("%s: the camera did not accept %s", self.uri, ", ".join(refused))

    # -- reading -------------------------------------------------------------------------------
    def read(self) -> Frame | None:
        if self._closing.is_set() or self.state == "ended":
            return None
        if self._image is not None:
            return self._read_image()
        bad = 0
        while not self._closing.is_set():
            self._pace()
            img = self._grab()
            frame = None if img is None else self._emit(img, **self._meta())
            if frame is not None:
                self.dropped, self._failed = self.dropped + self._failed, 0  # undecodable frames skipped
                return frame
            bad += 1
            if not self._after_failure(bad, got_image=img is not None):
                break
            if self.live and bad >= FAIL_LIMIT:
                bad = 0  # reconnected
        self.state = "ended"
        return None

    def _grab(self) -> np.ndarray | None:
        with self._lock:
            if self._pending is not None:
                img, self._pending = self._pending, None
                return img
            if self._cap is None:
                return None
            try:
                ok, img = self._cap.read()
            except cv2.error as e:
                self.last_error = str(e).strip().splitlines()[-1]
                return None
        return img if ok else None

    def _after_failure(self, bad: int, got_image: bool) -> bool:
        """A read gave no image or an unusable one. True: keep reading; False: the stream ends."""
        if self.live:
            if bad < FAIL_LIMIT:
                return True
            self._release()
            if not self.reconnect_enabled:
                return False
            return self._reconnect_loop(lambda: self._open_once(self.timeout_s), self.backoff_s,
                                        self.backoff_max_s, self.reconnect_timeout_s)
        if got_image:
            return bad <= self.max_bad_frames  # a decoded but unusable frame (counted): skip it
        with self._lock:
            pos = int(self._cap.get(cv2.CAP_PROP_POS_FRAMES)) if self._cap is not None else 0
        if not (self.frame_count and pos >= self.frame_count) and bad <= self.max_bad_frames:
            self._failed += 1  # a frame that did not decode, or the end: the next reads tell
            return True
        self._failed = 0
        if self.loop and self.frames > 0:  # end of the file (or of its readable part): rewind
            with self._lock:
                return bool(self._cap is not None and self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0))
        return False

    def _meta(self) -> dict:
        if self.live:
            return {}
        with self._lock:
            pos = int(self._cap.get(cv2.CAP_PROP_POS_FRAMES)) - 1 if self._cap is not None else -1
        return {"pos_frames": pos}

    def _pace(self) -> None:
        """Files with realtime=True play at `fps` (default: the file's own rate); cameras pace themselves."""
        if self.live or not self.realtime:
            return
        if not self.fps:
            with self._lock:
                self.fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0) if self._cap is not None else 0.0
            self.fps = self.fps or 30.0
        now = time.monotonic()
        if self._next_t > now:
            self._closing.wait(self._next_t - now)
        self._next_t = max(now, self._next_t) + 1.0 / self.fps

    def _read_image(self) -> Frame | None:
        """One image: delivered once, or again and again with loop=True (at `fps` when given)."""
        if self.frames > 0 and not self.loop:
            self.state = "ended"
            return None
        if self.fps:
            self.realtime = True
            self._pace()
        return self._emit(self._image, path=str(self.t.target))

    # -- bookkeeping ---------------------------------------------------------------------------
    def stats(self) -> dict:
        s = super().stats()
        s.update(kind=self.t.kind, controls=dict(self.controls))
        if self.t.kind == "file":  # a truncated or damaged file ends with frames missing
            s["frame_count"] = self.frame_count
            s["missing_frames"] = (max(self.frame_count - self.frames - self.dropped, 0)
                                   if self.state == "ended" and not self.loop else 0)
        return s

    def _release(self) -> None:
        with self._lock:
            if self._cap is not None:
                self._cap.release()
                self._cap = None

    def close(self) -> None:
        """Safe from another thread: waits for a read in progress (up to 2 s) before releasing."""
        super().close()
        if self._lock.acquire(timeout=2.0):
            try:
                if self._cap is not None:
                    self._cap.release()
                    self._cap = None
            finally:
                self._lock.release()


# OpenCV's and FFmpeg's own warning lines would duplicate our one-line errors (set the variables to see them).
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
if os.environ.get("OPENCV_LOG_LEVEL") is None:
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # pragma: no cover - builds without the logging module
        pass
