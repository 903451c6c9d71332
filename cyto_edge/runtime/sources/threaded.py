"""A capture thread that keeps only the newest frame: bounded latency, never a backlog.

    with LatestFrameReader(open_source("v4l2:///dev/video0")) as cam:
        while (frame := cam.read(timeout=1.0)) is not None or not cam.ended:
            ...

A consumer slower than the camera sees the newest frame each time (increasing indices) and the frames
it missed are counted in `dropped`; it never receives an old one. Exceptions from the source do not end
the thread: the reader reports "lost", waits with exponential back-off, calls `source.reconnect()` when
the source has one, and reports "live" again at the next frame. A live source (`source.live`) that
returns None is treated as lost too; a file or a folder that returns None has ended.
"""
from __future__ import annotations

import collections
import threading
import time

from cyto_edge.runtime.sources import Frame, Source


class LatestFrameReader:
    def __init__(self, source: Source, *, backoff_s: float = 0.2, backoff_max_s: float = 5.0,
                 max_failures: int | None = None, fps_window: int = 30, start: bool = True):
        self.source = source
        self.backoff_s, self.backoff_max_s, self.max_failures = backoff_s, backoff_max_s, max_failures
        self.frames = 0          # frames captured from the source
        self.delivered = 0       # frames handed to the consumer
        self.dropped = 0         # frames replaced by a newer one before the consumer read them
        self.failures = 0        # source exceptions (or None from a live source)
        self.reconnects = 0      # recoveries after a failure
        self.error: str = ""     # the last failure
        self.transitions: collections.deque = collections.deque(maxlen=256)  # (monotonic time, state)
        self._state = ""
        self._set_state("connecting")
        self._latest: Frame | None = None
        self._unseen = False
        self._times: collections.deque = collections.deque(maxlen=max(fps_window, 2))
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # -- the capture thread ----------------------------------------------------------------------
    def start(self) -> "LatestFrameReader":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="latest-frame-reader")
            self._thread.start()
        return self

    def _run(self) -> None:
        consecutive = 0
        live = bool(getattr(self.source, "live", False))
        while not self._stop.is_set():
            try:
                frame = self.source.read()
                problem = None if frame is not None or not live else "the live source returned no frame"
            except Exception as e:  # noqa: BLE001 - any source failure is reported and retried
                frame, problem = None, f"{type(e).__name__}: {e}"
            if problem is None and frame is None:
                break  # a file or folder ended
            if problem is not None:
                consecutive += 1
                if not self._recover(problem, consecutive):
                    break
                continue
            if consecutive:
                self.reconnects += 1
                consecutive = 0
            self._publish(frame)
        with self._cond:
            self._set_state("ended")
            self._cond.notify_all()

    def _publish(self, frame: Frame) -> None:
        with self._cond:
            if self._unseen:
                self.dropped += 1
            self._latest, self._unseen = frame, True
            self.frames += 1
            self._times.append(time.monotonic())
            self._set_state("live")
            self._cond.notify_all()

    def _recover(self, problem: str, consecutive: int) -> bool:
        """Report "lost", back off, ask the source to reconnect. False when the reader gives up."""
        self.failures += 1
        self.error = problem
        self._set_state("lost")
        if self.max_failures is not None and consecutive > self.max_failures:
            return False
        delay = min(self.backoff_s * 2.0 ** (consecutive - 1), self.backoff_max_s)
        if self._stop.wait(delay):
            return False
        reconnect = getattr(self.source, "reconnect", None)
        if callable(reconnect):
            try:
                reconnect()
            except Exception as e:  # noqa: BLE001 - the next read decides; keep the reason
                self.error = f"reconnect: {type(e).__name__}: {e}"
        return True

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            self.transitions.append((time.monotonic(), state))

    # -- the consumer side -------------------------------------------------------------------
    def read(self, timeout: float | None = None) -> Frame | None:
        """The newest frame not yet returned; waits up to `timeout` s (None: until one comes or the stream
        ends). None on timeout or at the end (see `ended`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._unseen:
                if self._state == "ended":
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            self._unseen = False
            self.delivered += 1
            return self._latest

    @property
    def state(self) -> str:
        """connecting | live | lost | ended; a source reconnecting on its own reports "lost" through here."""
        src = getattr(self.source, "state", None)
        if self._state == "live" and src in ("lost", "connecting"):
            return "lost"
        return self._state

    @property
    def ended(self) -> bool:
        return self._state == "ended" and not self._unseen

    @property
    def fps(self) -> float:
        """Capture rate over the last `fps_window` frames (0 until two frames came)."""
        with self._cond:
            t = list(self._times)
        if len(t) < 2 or t[-1] <= t[0]:
            return 0.0
        return (len(t) - 1) / (t[-1] - t[0])

    def stats(self) -> dict:
        s = {"state": self.state, "frames": self.frames, "delivered": self.delivered, "dropped": self.dropped,
             "failures": self.failures, "reconnects": self.reconnects, "fps": round(self.fps, 2),
             "error": self.error}
        src = getattr(self.source, "stats", None)
        if callable(src):
            s["source"] = src()
        return s

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the capture thread (the source stays open). A thread stuck in the source is abandoned after
        `timeout` s (it is a daemon thread)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread and close the source. A source blocked in read() is closed to unblock it."""
        self._stop.set()
        t = self._thread
        if t is not None and t.is_alive():
            t.join(min(timeout, 0.5))
        self.source.close()
        if t is not None and t.is_alive():
            t.join(timeout)
        with self._cond:
            self._set_state("ended")
            self._cond.notify_all()

    def __enter__(self) -> "LatestFrameReader":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
