"""The live loop: source -> preview on every frame, FOVs graded once, in their own thread.

    runner = LiveRunner(source, pipeline, FovTracker(cfg), on_preview=show, on_fov=store, on_state=log)
    stats = runner.run(max_frames=None, stop_event=stop)

Capture: a live source (a camera, a stream, synth:// in real time) is read through LatestFrameReader, so
the loop always takes the newest frame (the frames it could not take are counted as dropped); a recording
(a file, a folder, synth:// with realtime=0) is read frame by frame, every frame processed.

Per frame, in the calling thread: FovTracker.update (stage still, sharp, not empty: a FOV event), then
every `preview_every` frames the preview path and the overlay, handed to `on_preview(frame, result,
overlay_bgr)`. The capture-to-overlay latency is measured from the frame's capture timestamp.

While the stage stays still on a field that has been sent for grading (`hold_still`, the default), the
preview does not run the model: it draws the field's last preview detections until the FOV is graded,
then the graded ones (those the store keeps). The grading thread gets the cores the preview model would
have used, and the screen shows what is stored. Motion, or a drift of more than `hold_drift_px` frame
pixels since the hold began, runs the model again on the next frame.

FOVs go to one grading worker thread through a queue of `fov_queue` events: the worker first runs one
blank batch through the engine (`Pipeline.warm_up`), then grades one FOV at a time (`pipeline.grade`)
and calls `on_fov(event, result)`; on Linux it runs `grade_nice` steps nicer
than the loop, so that grading does not starve the preview. When the queue is full, a live source's
newest FOV replaces the oldest waiting one (counted in `fovs_dropped`, ids kept in `dropped_fov_ids`);
a recording waits instead, so no FOV of a recording is ever dropped. At the end the worker finishes the
FOVs already queued. When a recording ends on a still field not yet graded, its best frame is graded
(FovTracker.flush). `grade_every_frame=True` grades every frame instead (a folder of FOV images).

`on_state(state, info)` reports the source state as it changes (connecting, live, lost, ended) and
errors: "engine_error" (the preview or grading failed; the loop carries on), "callback_error".
"""
from __future__ import annotations

import collections
import os
import threading
import time
from typing import Callable

import numpy as np

from cyto_edge.runtime.draw import draw_overlay
from cyto_edge.runtime.fov import FovEvent, FovTracker
from cyto_edge.runtime.sources import Frame
from cyto_edge.runtime.sources.threaded import LatestFrameReader

WINDOW = 2000          # samples kept per statistic (bounded memory on long runs)


class _Ring:
    """The last WINDOW samples of one statistic in a float64 ring buffer (no per-sample Python objects)."""

    __slots__ = ("buf", "n", "i")

    def __init__(self):
        self.buf, self.n, self.i = np.empty(WINDOW), 0, 0

    def append(self, v: float) -> None:
        self.buf[self.i] = v
        self.i = (self.i + 1) % WINDOW
        self.n = min(self.n + 1, WINDOW)

    def array(self) -> np.ndarray:
        """The samples (oldest first), a copy."""
        if self.n < WINDOW:
            return self.buf[:self.n].copy()
        return np.concatenate((self.buf[self.i:], self.buf[:self.i]))


def _quantiles(a: np.ndarray, qs=(50, 95)) -> dict:
    """{"p50": .., "p95": ..} in one partition of the samples; None for no samples."""
    if not a.size:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": round(float(v), 3) for q, v in zip(qs, np.percentile(a, qs))}


def _lower_priority(nice: int) -> None:
    """Make the calling thread yield the CPU to the preview (Linux: per-thread niceness); no-op elsewhere."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:
        pass


def is_live(source) -> bool:
    """A camera / stream, or synth:// pacing itself in real time (frames come whether read or not)."""
    return bool(getattr(source, "live", False) or getattr(source, "realtime", False))


class _Stats:
    """Bounded samples of latencies and stage timings. Summaries cost well under a millisecond: the
    /metrics and /api/status pollers ask for them every second while both cores grade."""

    def __init__(self):
        self.samples: dict[str, _Ring] = collections.defaultdict(_Ring)
        self.lock = threading.Lock()

    def add(self, name: str, value: float) -> None:
        with self.lock:
            self.samples[name].append(float(value))

    def add_timings(self, prefix: str, timings: dict) -> None:
        with self.lock:
            for k, v in timings.items():
                self.samples[f"{prefix}.{k}"].append(float(v))

    def summary(self, prefix: str) -> dict:
        with self.lock:
            items = {k[len(prefix) + 1:]: v.array() for k, v in self.samples.items() if k.startswith(prefix + ".")}
        return {k: _quantiles(v) for k, v in sorted(items.items())}

    def values(self, name: str) -> np.ndarray:
        with self.lock:
            r = self.samples.get(name)
            return r.array() if r is not None else np.empty(0)


class LiveRunner:
    def __init__(self, source, pipeline, tracker: FovTracker, *, on_preview: Callable | None = None,
                 on_fov: Callable | None = None, on_state: Callable | None = None, preview_every: int = 1,
                 latest_only: bool | None = None, fov_queue: int = 2, grade_every_frame: bool = False,
                 overlay: bool = True, read_timeout: float = 0.5, grade_nice: int = 5, hold_still: bool = True,
                 hold_drift_px: float = 4.0):
        self.source, self.pipeline, self.tracker = source, pipeline, tracker
        self.on_preview, self.on_fov, self.on_state = on_preview, on_fov, on_state
        self.preview_every = max(int(preview_every), 1) if preview_every else 0
        self.live = is_live(source) if latest_only is None else bool(latest_only)
        self.fov_queue, self.grade_every_frame, self.overlay = max(int(fov_queue), 1), grade_every_frame, overlay
        self.read_timeout, self.grade_nice = read_timeout, int(grade_nice)
        self.hold_still, self.hold_drift_px = bool(hold_still), float(hold_drift_px)
        self._hold: tuple | None = None       # (stop, tracker drift when held, graded Detections or None)
        self._last_det: tuple | None = None   # (stop, Detections) of the last preview that ran the model
        self.reader: LatestFrameReader | None = None
        self._q: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._worker: threading.Thread | None = None
        self._stats = _Stats()
        self._stop_start: dict[int, float] = {}        # tracker stop -> timestamp of its first still frame
        self._state = ""
        self._t0 = self._t_end = None
        self.frames = self.previews = self.previews_held = 0
        self.fovs_submitted = self.fovs_graded = self.fovs_dropped = 0
        self.engine_errors = self.callback_errors = 0
        self.dropped_fov_ids: collections.deque = collections.deque(maxlen=WINDOW)   # the latest ones
        self.last_grade = None
        self.last_error = ""

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self, max_frames: int | None = None, stop_event: threading.Event | None = None) -> dict:
        self._t0 = time.monotonic()
        self._worker = threading.Thread(target=self._grading_worker, name="fov-grader", daemon=True)
        self._worker.start()
        if self.live:
            self.reader = LatestFrameReader(self.source)
        try:
            while not (stop_event is not None and stop_event.is_set()):
                frame = self._next_frame()
                self._report_state()
                if frame is None:
                    if self._ended():
                        self._flush_tracker()
                        break
                    continue
                self._process(frame)
                if max_frames is not None and self.frames >= max_frames:
                    break
        finally:
            if self.reader is not None:
                self.reader.stop()
            self._finish_worker()
            self._t_end = time.monotonic()
            self._report_state(final=True)
        return self.stats()

    def _next_frame(self) -> Frame | None:
        if self.reader is not None:
            return self.reader.read(timeout=self.read_timeout)
        return self.source.read()

    def _ended(self) -> bool:
        return self.reader.ended if self.reader is not None else True

    def _source_state(self) -> str:
        if self.reader is not None:
            return self.reader.state
        return getattr(self.source, "state", "live")

    def _report_state(self, final: bool = False) -> None:
        state = "ended" if final and self._ended() else self._source_state()
        if state != self._state:
            self._state = state
            info = self.reader.stats() if self.reader is not None else {}
            self._emit_state(state, info)

    def _emit_state(self, state: str, info: dict) -> None:
        if self.on_state is not None:
            try:
                self.on_state(state, info)
            except Exception as e:  # noqa: BLE001 - a failing callback must not stop the loop
                self.callback_errors += 1
                self.last_error = f"on_state: {type(e).__name__}: {e}"

    def _process(self, frame: Frame) -> None:
        self.frames += 1
        t = time.perf_counter()
        stop_before = self.tracker.stop
        event = self.tracker.update(frame) if not self.grade_every_frame else self._every_frame_event(frame)
        if self.tracker.stop != stop_before:
            self._stop_start[self.tracker.stop] = frame.timestamp
            if len(self._stop_start) > WINDOW:
                self._stop_start.pop(next(iter(self._stop_start)))
        self._stats.add("preview.track", (time.perf_counter() - t) * 1e3)
        if event is not None:
            self._submit(event)
        if self.preview_every and self.frames % self.preview_every == 0:
            self._preview(frame)

    def _flush_tracker(self) -> None:
        """The stream ended on a still, uncaptured stop: grade its best frame (FovTracker.flush)."""
        flush = getattr(self.tracker, "flush", None)
        event = flush() if callable(flush) and not self.grade_every_frame else None
        if event is not None:
            self._submit(event)

    def _every_frame_event(self, frame: Frame) -> FovEvent:
        from cyto_edge.runtime.quality import analyze

        q = analyze(frame.image).quality
        self.tracker.stop += 1
        self.tracker.captured += 1
        return FovEvent(frame=frame, stop=self.tracker.stop, quality=q, relative_focus=1.0, reason="every",
                        waited_frames=0)

    def _held_detections(self):
        """The detections to draw without running the model (see the module docstring), or None."""
        with self._cond:
            h = self._hold
            if h is None:
                return None
            st = self.tracker.last
            if (st is None or st.state != "still" or st.stop != h[0]
                    or float(np.hypot(*(self.tracker.drift - h[1]))) > self.hold_drift_px):
                self._hold = None                    # the stage moved: the model runs again
                return None
        if h[2] is not None:
            return h[2]
        return self._last_det[1] if self._last_det is not None and self._last_det[0] == h[0] else None

    def _preview(self, frame: Frame) -> None:
        try:
            held = self._held_detections()
            res = self.pipeline.preview(frame.image, detections=held)
            if held is None:
                self._last_det = (self.tracker.stop, res.detections)
            else:
                self.previews_held += 1
        except Exception as e:  # noqa: BLE001 - an engine failure is reported; the loop carries on
            self.engine_errors += 1
            self.last_error = f"preview: {type(e).__name__}: {e}"
            self._emit_state("engine_error", {"where": "preview", "error": self.last_error})
            return
        t = time.perf_counter()
        overlay = None
        if self.overlay:
            st = self.tracker.last
            overlay = draw_overlay(res.image, res.detections, self.pipeline.classes, scale=res.scale,
                                   bethesda=self.pipeline.manifest.bethesda, grade=self.last_grade,
                                   focus=None if st is None else st.relative_focus, fps=self._fps(),
                                   state=None if st is None else st.state)
        self._stats.add_timings("preview", {**res.timings, "overlay": (time.perf_counter() - t) * 1e3})
        self.previews += 1
        self._stats.add("latency_ms", (time.monotonic() - frame.timestamp) * 1e3)
        if self.on_preview is not None:
            try:
                self.on_preview(frame, res, overlay)
            except Exception as e:  # noqa: BLE001
                self.callback_errors += 1
                self.last_error = f"on_preview: {type(e).__name__}: {e}"

    def _fps(self) -> float | None:
        if self.reader is not None and self.reader.fps:
            return self.reader.fps
        el = time.monotonic() - self._t0 if self._t0 else 0
        return self.frames / el if el > 0 else None

    # -- the grading worker -------------------------------------------------------------------------------
    def _submit(self, event: FovEvent) -> None:
        with self._cond:
            st = self.tracker.last
            if self.hold_still and st is not None and st.state == "still" and st.stop == event.stop:
                self._hold = (event.stop, self.tracker.drift, None)
            fov_id = self.fovs_submitted
            self.fovs_submitted += 1
            if len(self._q) >= self.fov_queue:
                if self.live:               # the newest FOV wins; the oldest waiting one is counted as dropped
                    old_id, _, _ = self._q.popleft()
                    self.fovs_dropped += 1
                    self.dropped_fov_ids.append(old_id)
                else:                       # a recording waits for the worker: nothing is dropped
                    while len(self._q) >= self.fov_queue and self._worker.is_alive():
                        self._cond.wait(0.5)
            self._q.append((fov_id, event, time.monotonic()))
            self._cond.notify_all()

    def _grading_worker(self) -> None:
        _lower_priority(self.grade_nice)
        warm_up = getattr(self.pipeline, "warm_up", None)
        if callable(warm_up) and not self.grade_every_frame:
            try:
                warm_up()                   # while the stage still moves to the first field
            except Exception as e:  # noqa: BLE001 - the first FOV will report the engine's error
                self.last_error = f"warm-up: {type(e).__name__}: {e}"
        while True:
            with self._cond:
                while not self._q and not self._closing:
                    self._cond.wait()
                if not self._q:
                    return
                fov_id, event, t_submit = self._q.popleft()
                self._cond.notify_all()
            self._grade_one(fov_id, event, t_submit)

    def _grade_one(self, fov_id, event: FovEvent, t_submit: float) -> None:
        try:
            result = self.pipeline.grade(event.frame.image, fov_id=fov_id, quality=event.quality.to_dict())
        except Exception as e:  # noqa: BLE001 - reported; the next FOV is graded
            self.engine_errors += 1
            self.last_error = f"grade: {type(e).__name__}: {e}"
            self._emit_state("engine_error", {"where": "grade", "fov_id": fov_id, "error": self.last_error})
            return
        if self.on_fov is not None:
            try:
                self.on_fov(event, result)
            except Exception as e:  # noqa: BLE001
                self.callback_errors += 1
                self.last_error = f"on_fov: {type(e).__name__}: {e}"
                self._emit_state("callback_error", {"where": "on_fov", "fov_id": fov_id, "error": self.last_error})
        with self._cond:
            if self._hold is not None and self._hold[0] == event.stop:
                self._hold = (*self._hold[:2], result.detections)   # the stored detections from now on
        now = time.monotonic()
        self.last_grade = result.grade
        self.fovs_graded += 1
        self._stats.add_timings("grade", result.timings)
        self._stats.add("fov_latency_ms", (now - event.frame.timestamp) * 1e3)
        self._stats.add("queue_wait_ms", (now - t_submit) * 1e3 - result.timings.get("total", 0.0))
        start = self._stop_start.get(event.stop)
        if start is not None:
            self._stats.add("still_to_stored_ms", (now - start) * 1e3)

    def _finish_worker(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join()

    # -- statistics -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        end = self._t_end or time.monotonic()
        el = end - self._t0 if self._t0 else 0.0
        lat = self._stats.values("latency_ms")
        q = self._stats.values
        s = {"elapsed_s": round(el, 3), "frames": self.frames, "previews": self.previews, "previews_held": self.previews_held,
             "fps": round(self.frames / el, 2) if el > 0 else None, "live": self.live,
             "latency_ms": {**_quantiles(lat), "max": round(float(lat.max()), 3) if lat.size else None},
             "frames_dropped": self._frames_dropped(),
             "fovs": {"submitted": self.fovs_submitted, "graded": self.fovs_graded, "dropped": self.fovs_dropped,
                      "dropped_ids": list(self.dropped_fov_ids), "engine_errors": self.engine_errors,
                      "callback_errors": self.callback_errors},
             "fov_latency_ms": _quantiles(q("fov_latency_ms")), "still_to_stored_ms": _quantiles(q("still_to_stored_ms")),
             "preview_ms": self._stats.summary("preview"), "grade_ms": self._stats.summary("grade"),
             "tracker": self.tracker.stats(), "last_error": self.last_error}
        if self.reader is not None:
            s["capture"] = self.reader.stats()
        return s

    def _frames_dropped(self) -> int:
        n = self.reader.dropped if self.reader is not None else 0
        src = getattr(self.source, "dropped", 0) or 0
        skipped = getattr(self.source, "skipped", 0) or 0   # synth:// in real time: frames a late reader missed
        return int(n + src + skipped)
