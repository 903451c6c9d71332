"""The screening service: the camera, the live pipeline (LiveRunner), slide sessions and the store.

    svc = Service(profile, store)
    svc.start()                         # resumes an open session, opens the camera in its own thread
    svc.start_session("S-1", "op", "")  # FOVs graded from now on are stored in this session
    svc.swap_bundle(path)               # verified first; the old bundle stays when the new one fails
    svc.stop()                          # FOVs in flight are graded and stored, then the thread ends

States shown on the pages, the API and /metrics: camera connecting | live | lost | ended (a camera that
fails is reopened with exponential back-off, the stream shows "camera lost"); engine loading | ok |
degraded (an inference failed: the error is shown, the loop carries on) | error (no usable bundle: the
live view shows the camera with the error, a bundle can be swapped in). A recording or synth:// source
that ends is reopened after a pause, so a demo goes round. Session durations come from the monotonic
clock and are saved with every FOV and every 10 s.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from cyto_edge.runtime.daemon import live_view
from cyto_edge.runtime.daemon.logs import event, get_logger
from cyto_edge.runtime.daemon.queries import Queries
from cyto_edge.runtime.daemon.recorder import Recorder, software_versions
from cyto_edge.runtime.daemon.retention import Housekeeper
from cyto_edge.runtime.daemon.store import SessionConflict, Store

log = get_logger("service")
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 30.0
REOPEN_AFTER_END_S = 2.0
ACTIVE_SAVE_EVERY_S = 10.0
RETENTION_EVERY_S = 600.0
FOV_QUEUE = 2
PREVIEW_FPS = 15.0     # the live view is drawn at most about this often; every frame is still tracked


class Service:
    def __init__(self, profile, store: Store, *, bundle_path: str | Path | None = None):
        from cyto_edge.runtime.fov import FovTracker

        self.profile, self.store = profile, store
        self.bundle_path = Path(bundle_path or profile.bundle)
        st = profile.storage
        self.hk = Housekeeper(store, st.retention_days, st.disk_budget_mb * 2**20)
        self.recorder = Recorder(store, self.hk, jpeg_quality=st.jpeg_quality)
        self.queries = Queries(store)
        self.preview = live_view.PreviewBuffer()
        self.tracker = FovTracker(profile.pipeline.fov_config())
        self.camera_state, self.camera_error = "connecting", ""
        self.engine_state, self.engine_error, self._error_where = "loading", "", ""
        self.pipeline = self.runner = None
        self.versions: dict = {}
        self.session: dict | None = None
        self._active_base, self._active_t0 = 0.0, time.monotonic()
        self._session_lock = threading.RLock()
        self.totals = {"frames": 0, "frames_dropped": 0, "fovs_graded": 0, "fovs_dropped": 0, "engine_errors": 0}
        self.fovs_unsaved = self.store_errors = 0
        self.last_fov: dict | None = None
        self.last_preview_mono = 0.0
        self._fps_times: list[tuple[float, int]] = []    # (monotonic s, frames processed so far)
        self._raw_frames = 0
        self._stats_cache: tuple = (None, 0.0, {})
        self._stop, self._cycle = threading.Event(), threading.Event()
        self._pending: tuple | None = None
        self._swap_lock = threading.Lock()
        self._applied = threading.Condition()
        self._thread: threading.Thread | None = None
        self.started_mono = time.monotonic()
        self._last_active_save = self._last_retention = time.monotonic()

    # -- life cycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        swept = self.store.recover()
        event(log, "store recovered", integrity=self.store.integrity(), **swept)
        self.hk.apply_retention()
        s = self.store.current_session()
        if s is not None:
            self.store.mark_resumed(s["id"])
            self.session, self._active_base, self._active_t0 = s, float(s["active_s"]), time.monotonic()
            event(log, "session resumed", session=s["id"], active_s=round(self._active_base, 1))
        try:
            self._install(self.load_pipeline(self.bundle_path), self.bundle_path)
        except Exception as e:  # noqa: BLE001 - a bad bundle must not stop the service: degraded, shown
            self._engine_failed(e)
        self._thread = threading.Thread(target=self._camera_loop, name="camera", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the FOVs in flight (graded and stored), stop the camera, save the session's duration."""
        self._stop.set()
        self._cycle.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._session_lock:
            if self.session is not None:
                self.store.update_active(self.session["id"], self.active_s())
        event(log, "service stopped", fovs_stored=self.recorder.stored)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def healthy(self) -> bool:
        """For the watchdog: the camera thread runs and, while the camera is live, previews keep coming."""
        if not self.alive:
            return False
        stalled = self.camera_state == "live" and self.pipeline is not None and self.last_preview_mono and \
            time.monotonic() - self.last_preview_mono > 60
        return not stalled

    def tick(self) -> None:
        """Called about once a second by the main loop: saves the session's duration, applies retention."""
        now = time.monotonic()
        if now - self._last_active_save >= ACTIVE_SAVE_EVERY_S and self._session_lock.acquire(timeout=0.2):
            try:        # never wait long behind a FOV being written: the watchdog loop calls this
                self._last_active_save = now
                if self.session is not None:
                    self.store.update_active(self.session["id"], self.active_s())
            finally:
                self._session_lock.release()
        if now - self._last_retention >= RETENTION_EVERY_S:
            self._last_retention = now
            self.hk.apply_retention()

    # -- sessions -----------------------------------------------------------------------------------------------
    def active_s(self) -> float:
        return self._active_base + (time.monotonic() - self._active_t0)

    def start_session(self, slide_id: str, operator: str = "", notes: str = "") -> dict:
        with self._session_lock:
            sha = self.pipeline.bundle_sha if self.pipeline is not None else ""
            s = self.store.open_session(slide_id, operator, notes, bundle_sha=sha, profile=self.profile.name)
            self.session, self._active_base, self._active_t0 = s, 0.0, time.monotonic()
        event(log, "session started", session=s["id"])
        return self.queries.session(s["id"])

    def stop_session(self, session_id: int | None = None) -> dict:
        with self._session_lock:
            if self.session is None or (session_id is not None and session_id != self.session["id"]):
                raise SessionConflict("no such open session" if session_id is None else
                                      f"session {session_id} is not the open session")
            sid = self.session["id"]
            self.store.close_session(sid, self.active_s())
            self.session = None
        event(log, "session stopped", session=sid)
        return self.queries.session(sid)

    # -- bundles --------------------------------------------------------------------------------------------------
    def load_pipeline(self, path: Path):
        """Open and verify a bundle (hashes, profile overrides), build the pipeline, run one inference."""
        from cyto_edge.runtime.bundle import Bundle
        from cyto_edge.runtime.pipeline import build_pipeline
        from cyto_edge.runtime.profile import check_against_bundle

        bundle = Bundle.open(path, verify=True)
        for w in check_against_bundle(self.profile, bundle.manifest, source=f"profile {self.profile.name}"):
            event(log, "bundle warning: " + w, level=30)
        pipe = build_pipeline(bundle, profile=self.profile)
        cam = self.profile.camera
        pipe.preview(np.full((cam.height or 480, cam.width or 640, 3), 200, np.uint8))  # the engine really runs
        return pipe

    def swap_bundle(self, path: str | Path, timeout: float = 60.0) -> dict:
        """Verify `path` and switch to it between frames; raises (the old bundle kept) when it fails."""
        path = Path(path)
        with self._swap_lock:
            try:
                new = self.load_pipeline(path)
            except Exception as e:  # noqa: BLE001 - reported to the caller; the running bundle stays
                event(log, "bundle refused", level=30, error=_short(e))
                self.store.add_event("bundle_refused", _short(e))
                raise BundleRefused(_short(e)) from None
            with self._applied:
                self._pending = (new, path)
                self._cycle.set()
                if not self._applied.wait_for(lambda: self._pending is None, timeout) and not self.alive:
                    self._apply_pending()
        event(log, "bundle swapped", sha=new.bundle_sha[:12])
        self.store.add_event("bundle_swapped", f"{path.name} sha256 {new.bundle_sha[:12]}")
        return self.bundle_info()

    def _apply_pending(self) -> None:
        with self._applied:
            if self._pending is None:
                return
            new, path = self._pending
            old, self._pending = self.pipeline, None
            self._install(new, path)
            self._applied.notify_all()
        if old is not None and hasattr(old.engine, "close"):
            old.engine.close()

    def _install(self, pipe, path: Path) -> None:
        self.pipeline, self.bundle_path = pipe, Path(path)
        self.queries.set_policy(pipe.policy)                 # adequacy and gallery size as the profile says
        self.engine_state, self.engine_error, self._error_where = "ok", "", ""
        eng = pipe.engine
        self.versions = software_versions(getattr(eng, "name", ""), getattr(eng, "precision", ""))
        event(log, "bundle loaded", sha=pipe.bundle_sha[:12], classes=len(pipe.classes))

    def bundle_info(self) -> dict:
        p = self.pipeline
        return {"path": str(self.bundle_path), "loaded": p is not None,
                "sha256": p.bundle_sha if p else None, "name": p.manifest.name if p else None,
                "classes": p.classes if p else [], "engine": self.versions.get("engine"),
                "state": self.engine_state, "error": self.engine_error}

    def _engine_failed(self, e: Exception) -> None:
        self.engine_state, self.engine_error = "error", _short(e)
        event(log, "engine unavailable: " + self.engine_error, level=40)
        self.store.add_event("engine_error", self.engine_error)

    # -- the camera thread -------------------------------------------------------------------------------------
    def _camera_loop(self) -> None:
        from cyto_edge.runtime.profile import open_camera

        backoff = BACKOFF_MIN_S
        while not self._stop.is_set():
            self._apply_pending()
            try:
                source = open_camera(self.profile)
            except Exception as e:  # noqa: BLE001 - reconnect with back-off, shown as "camera lost"
                self._camera_lost(_short(e))
                self._wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            backoff = BACKOFF_MIN_S
            try:
                ended = self._run_source(source)
            except Exception as e:  # noqa: BLE001
                self._camera_lost(_short(e))
                ended = False
            finally:
                source.close()
            if ended and not self._stop.is_set():
                self._set_camera("ended", "the source ended; reopening")
                self._wait(REOPEN_AFTER_END_S)

    def _wait(self, seconds: float) -> None:
        if self._cycle.wait(seconds) and not self._stop.is_set():
            self._cycle.clear()

    def _run_source(self, source) -> bool:
        """Run the pipeline on an open source until it ends (True), or a stop (False); swaps in between."""
        from cyto_edge.runtime.live import LiveRunner

        while not self._stop.is_set():
            self._apply_pending()
            self._cycle.clear()
            if self._stop.is_set() or self._pending is not None:
                continue
            if self.pipeline is None:
                if self._raw_loop(source):
                    return True
                continue
            runner = LiveRunner(source, self.pipeline, self.tracker, on_preview=self._on_preview,
                                on_fov=self._on_fov, on_state=self._on_state, fov_queue=FOV_QUEUE,
                                preview_every=max(1, round(self.profile.camera.fps / PREVIEW_FPS)))
            self.runner = runner
            try:
                runner.run(stop_event=self._cycle)
            finally:
                self._retire(runner)
            if not self._cycle.is_set():
                return True
        return False

    def _raw_loop(self, source) -> bool:
        """No usable bundle: show the camera with the engine error until a bundle arrives or a stop."""
        from cyto_edge.runtime.draw import draw_overlay

        while not self._cycle.is_set():
            frame = source.read()
            if frame is None:
                return True
            img = draw_overlay(_fit(frame.image, self.profile.pipeline.preview_max_side), None, None,
                               state="ENGINE ERROR: " + self.engine_error[:60])
            self.preview.publish(img)
            self._set_camera("live", "")
            self._raw_frames += 1
            self._tick_fps()
            self._cycle.wait(0.1)
        return False

    def _retire(self, runner) -> None:
        s = runner.stats()
        f = s["fovs"]
        for k, v in (("frames", s["frames"]), ("frames_dropped", s["frames_dropped"]), ("fovs_graded", f["graded"]),
                     ("fovs_dropped", f["dropped"]), ("engine_errors", f["engine_errors"])):
            self.totals[k] += int(v or 0)
        self.runner = None

    # -- LiveRunner callbacks ------------------------------------------------------------------------------------
    def _on_preview(self, frame, res, overlay) -> None:
        self._tick_fps()
        if self._error_where == "preview":
            self.engine_state, self.engine_error, self._error_where = "ok", "", ""
        if overlay is not None and self.camera_state != "lost":   # a stale frame must not hide "camera lost"
            st = self.tracker.last
            self.preview.publish(live_view.draw_focus_bar(overlay, None if st is None else st.relative_focus))

    def _on_fov(self, ev, result) -> None:
        if self._error_where == "grade":
            self.engine_state, self.engine_error, self._error_where = "ok", "", ""
        self.last_fov = {"grade": result.grade.grade, "suspicion": round(result.grade.suspicion, 4),
                         "learned_grade": (result.learned_grade or {}).get("grade"),
                         "n_detections": len(result.detections), "focus": result.quality.get("focus"),
                         "stop": ev.stop, "at_mono": time.monotonic(), "stored": None}
        with self._session_lock:
            if self.session is None:
                self.fovs_unsaved += 1
                return
            try:
                rec = self.recorder.record(self.session["id"], self.active_s(), ev, result,
                                           classes=self.pipeline.classes, versions=self.versions)
            except Exception:
                self.store_errors += 1
                raise
            self.last_fov["stored"] = rec

    def _on_state(self, state: str, info: dict) -> None:
        if state in ("connecting", "live", "lost", "ended"):
            err = info.get("error", "") if state == "lost" else ""
            if state == "lost":
                self._camera_lost(err or "no frames from the camera")
            else:
                self._set_camera(state, err)
        elif state == "engine_error":
            self.engine_state, self._error_where = "degraded", info.get("where", "")
            if info.get("error") != self.engine_error:
                self.engine_error = info.get("error", "")
                event(log, "engine error", level=40, where=self._error_where, error=self.engine_error)
                self.store.add_event("engine_error", self.engine_error)
        elif state == "callback_error":
            event(log, "could not store a FOV", level=40, error=info.get("error", ""))

    def _set_camera(self, state: str, error: str) -> None:
        if state != self.camera_state and not self.stopping:
            event(log, f"camera {state}", level=30 if state in ("lost", "ended") else 20)
        self.camera_state, self.camera_error = state, error

    def _camera_lost(self, error: str) -> None:
        if self.camera_state != "lost":
            self.store.add_event("camera_lost", error)
        self._set_camera("lost", error)
        self.preview.publish(live_view.status_frame("camera lost - reconnecting", error))

    def _tick_fps(self) -> None:
        now = time.monotonic()
        self.last_preview_mono = now
        frames = self.runner.frames if self.runner is not None else self._raw_frames
        self._fps_times = [x for x in self._fps_times[-120:] if now - x[0] < 2.0] + [(now, frames)]

    # -- figures ------------------------------------------------------------------------------------------------
    def fps(self) -> float:
        """Frames processed per second over the last 2 s (tracked frames, whether drawn or not)."""
        t = [x for x in self._fps_times if time.monotonic() - x[0] < 2.0]
        if len(t) < 2 or t[-1][0] <= t[0][0] or t[-1][1] < t[0][1]:
            return 0.0
        return round((t[-1][1] - t[0][1]) / (t[-1][0] - t[0][0]), 2)

    def runner_stats(self) -> dict:
        """LiveRunner.stats(), computed at most twice a second whatever the number of pollers."""
        r, now = self.runner, time.monotonic()
        if r is None:
            return {}
        cached = self._stats_cache
        if cached[0] is r and now - cached[1] < 0.5:
            return cached[2]
        s = r.stats()
        self._stats_cache = (r, now, s)
        return s


class BundleRefused(Exception):
    """A bundle that failed verification; the running one is kept."""


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg if len(msg) < 300 else msg[:297] + "..."


def _fit(img: np.ndarray, side: int) -> np.ndarray:
    import cv2

    s = side / max(img.shape[:2])
    return img if s >= 1 else cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
