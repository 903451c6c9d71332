"""Raspberry Pi cameras through picamera2 / libcamera: `picam2://0?width=2028&height=1520&fps=10`.

A microscope needs a fixed exposure and white balance: automatic exposure follows the density of the
field (a sparse field brightens, a dense one darkens) and changes the colours the model sees. By default
the source lets the automatic algorithms settle for `settle_s`, reads the exposure time, analogue gain
and colour gains they chose, and locks them (AeEnable / AwbEnable False); explicit `exposure_us`,
`analogue_gain` and `colour_gains` (red, blue) are used as given.

The "main" stream is RGB888, which libcamera lays out as B, G, R bytes: OpenCV's BGR, no conversion.

picamera2 and libcamera come from Raspberry Pi OS's packages, not from PyPI wheels:
    sudo apt install python3-picamera2      and a venv created with --system-site-packages
"""
from __future__ import annotations

import time
from urllib.parse import urlparse

from cyto_edge.errors import BadInput, MissingExtra
from cyto_edge.runtime.sources import Frame
from cyto_edge.runtime.sources.base import SourceBase, coerce, uri_options

HINT = "on Raspberry Pi OS: sudo apt install python3-picamera2 and create the venv with --system-site-packages"


def _import_picamera2():
    try:
        from picamera2 import Picamera2
    except ImportError:
        raise MissingExtra("picamera2", "picamera", hint=HINT) from None
    return Picamera2


class Picamera2Source(SourceBase):
    """A Raspberry Pi camera (HQ camera, camera module 3, ...) with exposure and white balance locked."""

    live = True

    def __init__(self, uri: str = "picam2://0", *, width: int | None = None, height: int | None = None,
                 fps: float | None = None, timeout_s: float = 5.0, still: bool | None = None,
                 lock_exposure: bool | None = None, exposure_us: int | None = None,
                 analogue_gain: float | None = None, lock_white_balance: bool | None = None, colour_gains: tuple[float, float] | None = None,
                 settle_s: float = 1.0, reconnect: bool = True, backoff_s: float = 0.5,
                 backoff_max_s: float = 10.0, reconnect_timeout_s: float | None = None):
        super().__init__(uri)
        self._Picamera2 = _import_picamera2()
        opts = uri_options(uri)
        g = lambda k, v, typ: coerce(k, opts.get(k) if v is None else v, typ)  # noqa: E731
        target = urlparse(uri).netloc or "0"
        if not target.isdigit():
            raise BadInput(f"{uri}: the camera must be a number (picam2://0)")
        self.index = int(target)
        self.width, self.height = g("width", width, int) or 2028, g("height", height, int) or 1520
        self.fps, self.timeout_s = g("fps", fps, float), float(timeout_s)
        self.still = bool(g("still", still, bool))
        self.lock_exposure = g("lock_exposure", lock_exposure, bool) is not False  # default: locked
        self.exposure_us, self.analogue_gain = g("exposure_us", exposure_us, int), g("analogue_gain", analogue_gain, float)
        self.lock_white_balance = g("lock_white_balance", lock_white_balance, bool) is not False
        self.colour_gains = tuple(colour_gains) if colour_gains else None
        self.settle_s = float(settle_s)
        self.backoff = (backoff_s, backoff_max_s, reconnect_timeout_s)
        self.reconnect_enabled = bool(reconnect)
        self.controls: dict = {}   # the controls set on the camera (the locked values)
        self._cam = None
        self._open()

    def _open(self) -> bool:
        cams = self._Picamera2.global_camera_info()
        if self.index >= len(cams):
            raise BadInput(f"{self.uri}: no camera {self.index}; libcamera sees {len(cams)} "
                           f"({', '.join(str(c.get('Model', '?')) for c in cams) or 'none'}): check the ribbon "
                           "cable and `rpicam-hello --list-cameras`")
        cam = self._Picamera2(self.index)
        try:
            main = {"size": (self.width, self.height), "format": "RGB888"}  # B, G, R in memory
            controls = {}
            if self.fps:
                frame_us = int(round(1e6 / self.fps))
                controls["FrameDurationLimits"] = (frame_us, frame_us)
            if self.still:  # full quality (HighQuality noise reduction), fewer buffers
                cfg = cam.create_still_configuration(main=main, controls=controls, buffer_count=2)
            else:
                cfg = cam.create_video_configuration(main=main, controls=controls, buffer_count=4)
            cam.configure(cfg)
            cam.start()
            self._lock(cam)
        except Exception:
            cam.close()
            raise
        self._cam = cam
        self.state = "live"
        return True

    def _lock(self, cam) -> None:
        """Fix exposure and white balance: the given values, or what the automatic algorithms settled on."""
        need_auto = ((self.lock_exposure and (self.exposure_us is None or self.analogue_gain is None))
                     or (self.lock_white_balance and self.colour_gains is None))
        md = {}
        if need_auto:
            time.sleep(self.settle_s)
            md = cam.capture_metadata(wait=self.timeout_s) or {}
        controls = {}
        if self.lock_exposure:
            controls["AeEnable"] = False
            controls["ExposureTime"] = int(self.exposure_us or md.get("ExposureTime", 10000))
            controls["AnalogueGain"] = float(self.analogue_gain or md.get("AnalogueGain", 1.0))
        if self.lock_white_balance:
            controls["AwbEnable"] = False
            controls["ColourGains"] = tuple(float(x) for x in (self.colour_gains or md.get("ColourGains", (1.0, 1.0))))
        if controls:
            cam.set_controls(controls)
        self.controls = controls

    def read(self) -> Frame | None:
        while not self._closing.is_set():
            try:
                (img,), md = self._cam.capture_arrays(["main"], wait=self.timeout_s)  # (H, W, 3) uint8 BGR
            except Exception as e:  # noqa: BLE001 - a timeout or a camera error: reconnect
                self.last_error = f"{type(e).__name__}: {e}"
                if not self.reconnect_enabled or not self._reconnect_loop(self.reconnect, *self.backoff):
                    break
                continue
            frame = self._emit(img, sensor_timestamp_ns=md.get("SensorTimestamp"),
                               exposure_us=md.get("ExposureTime"), analogue_gain=md.get("AnalogueGain"),
                               colour_gains=md.get("ColourGains"), lens_position=md.get("LensPosition"))
            if frame is not None:
                return frame
        self.state = "ended"
        return None

    def reconnect(self) -> bool:
        """Close and reopen the camera with the same settings (locks re-applied)."""
        self._close_cam()
        return self._open()

    def _close_cam(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            try:
                cam.stop()
            finally:
                cam.close()

    def stats(self) -> dict:
        s = super().stats()
        s.update(kind="picamera2", size=[self.width, self.height], controls={k: (list(v) if isinstance(v, tuple) else v)
                                                                           for k, v in self.controls.items()})
        return s

    def close(self) -> None:
        super().close()
        self._close_cam()
