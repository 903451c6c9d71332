"""`synth://`: a camera over the synthetic slide while a motorised stage moves between known stops.

    synth://?seed=0&fps=30&width=1280&height=960&stops=12&dwell=1.5&move=0.6&realtime=1&loop=0&path=OUT/slide

Timeline (virtual seconds, frame i at t = i / fps): the stage starts at stop 0; at each stop it holds still
for dwell_s while the focus drifts from somewhat defocused into focus; then it moves to the next stop in
`move` seconds (smooth acceleration, motion blur along the motion). After the last stop `read()` returns
None, unless loop=1 (then the stage returns to stop 0 and goes round again). Every frame carries mild
sensor noise, so consecutive still frames are never identical.

realtime=1 paces frames at fps (a late reader skips to the current frame, as a real camera would: the
gaps show in `Frame.index`); realtime=0 returns frames as fast as they render. `meta` holds the truth:
stage_x/stage_y (top-left of the view, slide px), moving, stop_id (None while moving), sharp (defocus
below SHARP_SIGMA_PX), empty (no cell centre in view), t (virtual s), focus_sigma_px, visit (loop count).

`schedule` is the list of stops [{id, x, y, dwell_s, empty, truth}] so that callers can count missed
and duplicate fields of view. The slide comes from the cache (rendered once per parameter set) or from
path= (a slide written by `cyto-edge synth OUT`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.runtime.sources import Frame
from cyto_edge.runtime.sources.base import SourceBase
from cyto_edge.synth.slide import SlideParams, cached_slide_dir, load_slide, make_schedule, view_truth

SHARP_SIGMA_PX = 0.5
FOCUS_LEVELS = (0.0, 0.5, 1.0, 1.6, 2.3, 3.1)     # defocus sigmas (px) rendered per stop
SHUTTER = 0.5                                     # exposure as a fraction of the frame period
GENERIC = {"timeout_s", "reconnect", "backoff_s", "backoff_max_s", "reconnect_timeout_s"}  # common; unused here
OPTIONS = {  # name: (type, default, check, what the check says)
    "seed": (int, 0, lambda v: v >= 0, ">= 0"), "fps": (float, 30.0, lambda v: 0 < v <= 1000, "in (0, 1000]"),
    "width": (int, 1280, lambda v: 64 <= v <= 8192, "in [64, 8192]"),
    "height": (int, 960, lambda v: 64 <= v <= 8192, "in [64, 8192]"),
    "stops": (int, 12, lambda v: 1 <= v <= 10000, ">= 1"), "dwell": (float, 1.5, lambda v: v > 0, "> 0"),
    "move": (float, 0.6, lambda v: v >= 0, ">= 0"), "realtime": (int, 1, lambda v: v in (0, 1), "0 or 1"),
    "loop": (int, 0, lambda v: v in (0, 1), "0 or 1"), "path": (str, "", lambda v: True, ""),
    "noise": (float, 1.5, lambda v: 0 <= v <= 50, "in [0, 50] (DN)"),
    "slide_width": (int, 4096, lambda v: v >= 64, ">= 64"), "slide_height": (int, 3072, lambda v: v >= 64, ">= 64"),
}


def parse_options(uri: str, options: dict, defaults: dict | None = None) -> dict:
    """URI query + keyword options (keywords win) -> typed, checked values; `defaults` replace the
    built-in defaults (a written slide's camera)."""
    q = {k: v[-1] for k, v in parse_qs(urlparse(uri).query, keep_blank_values=True).items()}
    q.update({k: v for k, v in options.items() if k not in GENERIC and v is not None})
    unknown = sorted(set(q) - set(OPTIONS))
    if unknown:
        raise BadInput(f"{uri}: unknown option {unknown[0]!r}; known: {', '.join(OPTIONS)}")
    out = {}
    for name, (typ, default, ok, what) in OPTIONS.items():
        raw = q.get(name, (defaults or {}).get(name, default))
        try:
            val = typ(float(raw)) if typ is int else typ(raw)
        except (TypeError, ValueError):
            raise BadInput(f"{uri}: {name} must be a {typ.__name__} (got {raw!r})") from None
        if not ok(val):
            raise BadInput(f"{uri}: {name} must be {what} (got {raw!r})")
        out[name] = val
    return out


@dataclass
class _State:
    x: float
    y: float
    vx: float            # px / s
    vy: float
    stop: int | None     # stop index while still
    since: float         # seconds since arrival at the stop
    visit: int


class SyntheticStageSource(SourceBase):
    live = False  # a recording-like source: None means the schedule has ended

    def __init__(self, uri: str = "synth://", **options):
        super().__init__(uri)
        o = parse_options(uri, options)
        if o["path"]:  # a written slide: its schedule's camera is the default
            self.slide = load_slide(o["path"])
            cam = self.slide.schedule.get("camera", {})
            o = parse_options(uri, options, {"width": cam.get("width"), "height": cam.get("height"),
                                             "fps": cam.get("fps"), "dwell": cam.get("dwell_s"),
                                             "move": cam.get("move_s"), "stops": len(self.slide.schedule["stops"]),
                                             "seed": self.slide.params.seed})
        self.fps, self.w, self.h = o["fps"], o["width"], o["height"]
        self.realtime, self.loop, self.noise = bool(o["realtime"]), bool(o["loop"]), o["noise"]
        self.move_s, self.dwell_s = o["move"], o["dwell"]
        if not o["path"]:
            p = SlideParams(seed=o["seed"], width=o["slide_width"], height=o["slide_height"], view_w=self.w,
                            view_h=self.h, stops=o["stops"], dwell_s=self.dwell_s, move_s=self.move_s, fps=self.fps)
            self.slide = load_slide(cached_slide_dir(p))
        cam = self.slide.schedule.get("camera", {})
        want = {"width": self.w, "height": self.h, "fps": self.fps, "move_s": self.move_s, "dwell_s": self.dwell_s}
        if any(cam.get(k) != v for k, v in want.items()) or len(self.slide.schedule.get("stops", [])) != o["stops"]:
            if self.w > self.slide.params.width or self.h > self.slide.params.height:
                raise BadInput(f"{uri}: view {self.w}x{self.h} is larger than the slide "
                               f"{self.slide.params.width}x{self.slide.params.height}")
            self.slide.schedule = make_schedule(self.slide, self.w, self.h, o["stops"], self.dwell_s, self.move_s, self.fps)
        self.schedule: list[dict] = self.slide.schedule["stops"]
        self.camera: dict = self.slide.schedule["camera"]
        self._pos = np.array([[s["x"], s["y"]] for s in self.schedule], np.float64)  # (S, 2)
        self._rng = np.random.default_rng(o["seed"])
        self._vignette = _vignette(self.h, self.w)
        self._noise_bank = _noise_bank(self._rng, self.h, self.w, self.noise)
        self._levels: dict[int, np.ndarray] = {}
        self._level_key: tuple | None = None
        self._next, self._t0, self._last_off = 0, None, None
        self.skipped = 0  # frames a late reader missed in realtime mode (gaps in Frame.index)

    # -- timeline ------------------------------------------------------------------------------------
    @property
    def duration_s(self) -> float:
        """Virtual length of one pass over the schedule (s)."""
        return len(self.schedule) * self.dwell_s + (len(self.schedule) - 1) * self.move_s

    def stage(self, t: float) -> _State | None:
        """Where the stage is at virtual time t (s); None after the end (without loop)."""
        n, d, m = len(self.schedule), self.dwell_s, self.move_s
        period = n * (d + m) if self.loop else self.duration_s
        visit = 0
        if self.loop:
            visit, t = int(t // period), t % period
        elif t >= period:
            return None
        k, r = int(t // (d + m)), t % (d + m)
        if r < d:
            x, y = self._pos[k]
            return _State(x, y, 0.0, 0.0, k, r, visit)
        u = (r - d) / m if m > 0 else 1.0
        a, b = self._pos[k], self._pos[(k + 1) % n]
        ease, dease = u * u * (3 - 2 * u), 6 * u * (1 - u) / max(m, 1e-9)
        x, y = a + (b - a) * ease
        vx, vy = (b - a) * dease
        return _State(x, y, vx, vy, None, 0.0, visit)

    def focus_sigma(self, st: _State) -> float:
        """Defocus (px) at a stop: starts at 1.2-3.0 px, in focus after min(0.45 dwell, 0.5 s)."""
        if st.stop is None:
            return 1.0
        s0 = np.random.default_rng([int(self.slide.params.seed), st.stop, st.visit]).uniform(1.2, 3.0)
        settle = min(0.45 * self.dwell_s, 0.5)
        return float(s0 * max(0.0, 1.0 - st.since / settle) ** 2)

    # -- frames --------------------------------------------------------------------------------------
    def read(self) -> Frame | None:
        if self._closing.is_set():
            return None
        i = self._next
        if self.realtime:
            now = time.monotonic()
            if self._t0 is None:
                self._t0 = now - i / self.fps
            due = self._t0 + i / self.fps
            if now < due:
                time.sleep(due - now)
            else:
                late = int((now - self._t0) * self.fps)  # a camera does not wait for a late reader
                self.skipped += max(0, late - i)
                i = max(i, late)
        t = i / self.fps
        st = self.stage(t)
        if st is None:
            self.state = "ended"
            return None
        sigma = self.focus_sigma(st)
        img = self._render(st, sigma)
        self._next = i + 1
        x, y = int(round(st.x)), int(round(st.y))
        empty = self.schedule[st.stop]["empty"] if st.stop is not None else view_truth(self.slide, x, y, self.w, self.h)["empty"]
        meta = {"stage_x": x, "stage_y": y, "moving": st.stop is None, "stop_id": st.stop,
                "sharp": st.stop is not None and sigma < SHARP_SIGMA_PX, "empty": bool(empty), "t": t,
                "focus_sigma_px": round(sigma, 3), "visit": st.visit}
        self.frames += 1
        self.state = "live"
        return Frame(img, i, time.monotonic(), meta)

    def _render(self, st: _State, sigma: float) -> np.ndarray:
        """(h, w, 3) uint8 BGR: the view at the stage position, blurred, vignetted, with sensor noise."""
        x, y = int(round(st.x)), int(round(st.y))
        view = self.slide.image[y:y + self.h, x:x + self.w]
        if st.stop is None:
            kx = int(min(81, abs(st.vx) * SHUTTER / self.fps)) + 1
            ky = int(min(81, abs(st.vy) * SHUTTER / self.fps)) + 1
            img = cv2.blur(view, (kx, ky)) if kx > 1 or ky > 1 else view
            img = cv2.multiply(img, self._vignette, scale=1.0 / 255.0)
        else:
            img = self._still(st, x, y, sigma)
        return self._add_noise(img)

    def _still(self, st: _State, x: int, y: int, sigma: float) -> np.ndarray:
        key = (st.stop, st.visit)
        if key != self._level_key:
            self._levels, self._level_key = {}, key
        lv = int(np.argmin([abs(sigma - s) for s in FOCUS_LEVELS]))
        if lv not in self._levels:  # rendered once per stop and focus level
            view = self.slide.image[y:y + self.h, x:x + self.w]
            img = cv2.GaussianBlur(view, (0, 0), FOCUS_LEVELS[lv]) if FOCUS_LEVELS[lv] > 0 else view
            self._levels[lv] = cv2.multiply(img, self._vignette, scale=1.0 / 255.0)
        return self._levels[lv]

    def _add_noise(self, img: np.ndarray) -> np.ndarray:
        if self._noise_bank is None:
            return img.copy()
        pos, neg = self._noise_bank
        while True:
            off = tuple(int(v) for v in self._rng.integers(0, 32, 2))
            if off != self._last_off:
                break
        self._last_off = off
        oy, ox = off
        out = cv2.add(img, pos[oy:oy + self.h, ox:ox + self.w])
        return cv2.subtract(out, neg[oy:oy + self.h, ox:ox + self.w])

    # -- lifecycle -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {**super().stats(), "skipped": self.skipped, "stops": len(self.schedule)}

    def close(self) -> None:
        super().close()
        self._levels = {}


def _vignette(h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8: the camera's light fall-off, 255 at the centre, ~205 in the corners."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (0.25 * (w * w + h * h))
    v = np.clip(255.0 * (1.0 - 0.2 * r2), 0, 255).astype(np.uint8)
    return np.repeat(v[..., None], 3, axis=2)


def _noise_bank(rng: np.random.Generator, h: int, w: int, std: float):
    """Positive and negative parts (uint8) of one Gaussian noise field, 32 px larger than the frame."""
    if std <= 0:
        return None
    n = rng.normal(0.0, std, (h + 32, w + 32, 3)).astype(np.float32)
    return np.clip(n, 0, 255).astype(np.uint8), np.clip(-n, 0, 255).astype(np.uint8)
