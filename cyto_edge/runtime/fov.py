"""Stage-still detection: each field of view (FOV) is captured once, when still, sharp and not empty.

`FovTracker.update(frame)` runs once per frame (a few ms at 1280x960) and returns a `FovEvent` when a
field should be graded. States:

    moving   --(motion below still_threshold_px)-->  settling  --(still_frames still frames)-->  still
       ^                                                                                         |
       +------------------------------ motion (or drift beyond new_field_fraction) ---------------+

Motion is the translation between consecutive frames by phase correlation (cv2.phaseCorrelate) on small
grey copies, in frame pixels per frame; when the correlation peak is too weak to trust (a jump larger
than the window, a featureless field), a mean grey difference decides. A stop emits at most one event,
and a new event needs motion first. While still, the tracker waits for focus to peak (no improvement of
the stop's best focus for `settle_frames` frames) at a level within `focus_relative` of the recent
fields' best (tissue-normalised, so sparse and dense fields compare) or, below that level, for no
improvement over `plateau_frames` frames (a field less sharp than the recent ones rather than a pause in
focusing), then emits the current frame if it is within `focus_relative` of the stop's best, else the
best frame itself; after `max_wait_frames` it takes the best frame of the stop. A frame is never emitted when empty, below `focus_floor`, or below
`focus_min_recent` x the recent best (tissue-normalised) focus: a blurred field is skipped, not graded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from cyto_edge.runtime.quality import Analysis, FocusHistory, FrameQuality, QualityConfig, analyze
from cyto_edge.runtime.sources import Frame


@dataclass
class FovConfig:
    still_threshold_px: float = 1.5    # frame pixels of motion per frame below which the stage is still
    still_frames: int = 3              # consecutive still frames before the stop counts
    focus_relative: float = 0.85       # the current frame is sharp when >= this x the stop's best focus
    focus_floor: float = 0.0           # never emit below this variance of the Laplacian
    focus_min_recent: float = 0.35     # never emit below this x the recent best focus_norm (blurred)
    settle_frames: int = 3             # frames without a better focus: focus has peaked
    max_wait_frames: int = 24          # still frames after which the stop's best frame is taken
    plateau_frames: int = 8            # frames without a better focus after which a field less sharp than
                                       # the recent ones is taken (fields differ: in-focus synth fields
                                       # score 0.6-1.0 of the recent best)
    empty_threshold: float = 0.005     # tissue fraction below which a field is empty (see quality.py)
    new_field_fraction: float = 0.25   # drift during a stop beyond this x the frame side: a new field
    recent_frames: int = 300           # window of the recent-best focus
    min_response: float = 0.3          # phase-correlation peak below which the shift is not trusted
    diff_threshold: float = 2.0        # mean |grey difference| (0-255, global change removed) meaning
                                       # motion when the shift is not trusted (noise alone is ~0.5-1)
    improve_eps: float = 0.01          # a focus better by this fraction counts as an improvement
    quality: QualityConfig = field(default_factory=QualityConfig)

    def __post_init__(self):
        self.quality.empty_threshold = self.empty_threshold


@dataclass
class FovEvent:
    frame: Frame              # the frame to grade, full resolution (may be earlier than the current one)
    stop: int                 # the tracker's stop counter, from 1
    quality: FrameQuality     # of that frame
    relative_focus: float     # its focus / the best focus of the stop
    reason: str               # "peak" (focus settled) | "timeout" (max wait) | "departure" (stage left) | "end"
    waited_frames: int        # still frames seen before the event


@dataclass
class FovStatus:
    """What the tracker saw in the last frame (for the live view and the logs)."""

    state: str
    stop: int
    motion_px: float          # estimated translation since the previous frame, frame pixels
    response: float           # phase-correlation peak (0-1)
    moving: bool
    quality: FrameQuality | None
    relative_focus: float     # focus_norm / recent best


class FovTracker:
    def __init__(self, config: FovConfig | None = None):
        self.cfg = config or FovConfig()
        self.state = "moving"
        self.stop = 0                 # stops started
        self.captured = 0
        self.skipped_empty = 0
        self.skipped_blurred = 0
        self.history = FocusHistory(self.cfg.recent_frames)
        self.last: FovStatus | None = None
        self._prev: np.ndarray | None = None   # previous small grey frame, float32
        self._window: np.ndarray | None = None
        self._shape: tuple[int, int] | None = None
        self._reset_stop()

    def _reset_stop(self) -> None:
        self._still = 0
        self._waited = 0
        self._best: tuple[Frame, Analysis] | None = None
        self._since_improve = 0
        self._done = False
        self._drift = np.zeros(2)
        self._empty_frames = 0        # frames of this stop (settling and still) below the tissue threshold
        self._tissue_frames = 0       # ... and above it

    # -- motion ----------------------------------------------------------------------------------
    def _motion(self, a: Analysis) -> tuple[np.ndarray, float, bool]:
        """(shift in frame px (dx, dy), phase-correlation response, moving?) against the previous frame.
        The shift is zero when the correlation peak is too weak to trust."""
        cur = a.small_gray.astype(np.float32)
        prev, self._prev = self._prev, cur
        if prev is None or prev.shape != cur.shape:
            return np.zeros(2), 1.0, False
        if self._window is None or self._window.shape != cur.shape:
            self._window = cv2.createHanningWindow((cur.shape[1], cur.shape[0]), cv2.CV_32F)
        d = cur - prev
        diff = float(np.mean(np.abs(d - d.mean())))  # a lamp flicker changes the mean, not the field
        # phaseCorrelate may apply the window in place (OpenCV 5): give it `prev` (done with) and a copy
        (dx, dy), resp = cv2.phaseCorrelate(prev, cur.copy(), self._window)
        shift = np.array([dx, dy]) / a.scale
        if resp < self.cfg.min_response:  # peak not trustworthy: fall back to the grey difference
            return np.zeros(2), float(resp), diff > self.cfg.diff_threshold
        return shift, float(resp), float(np.hypot(*shift)) > self.cfg.still_threshold_px

    # -- the state machine ---------------------------------------------------------------------
    def update(self, frame: Frame) -> FovEvent | None:
        a = analyze(frame.image, self.cfg.quality)
        shape = frame.image.shape[:2]
        resized = self._shape is not None and shape != self._shape  # the camera changed its frame size
        self._shape = shape
        if resized:
            self._prev = None  # frames of two sizes are not compared: a new field
        shift, resp, moving = self._motion(a)
        moving = moving or resized
        self.history.add(a.quality.focus_norm)
        if not moving and self.state != "moving":
            self._drift += shift
            side = min(frame.image.shape[:2])
            moving = float(np.hypot(*self._drift)) > self.cfg.new_field_fraction * side
        event = None
        if moving:
            if self.state == "still" and not self._done:
                event = self._emit_best("departure")
            self.state = "moving"
        else:
            if self.state == "moving":
                self.stop += 1
                self._reset_stop()
                self.state = "settling"
            self._still += 1
            self._consider(frame, a)
            if self.state == "settling" and self._still >= self.cfg.still_frames:
                self.state = "still"
            if self.state == "still" and not self._done:
                self._waited += 1
                event = self._decide(frame, a)
        self.last = FovStatus(self.state, self.stop, float(np.hypot(*shift)), resp, moving, a.quality,
                              self.history.relative(a.quality.focus_norm))
        return event

    def _consider(self, frame: Frame, a: Analysis) -> None:
        """Track the sharpest non-empty frame of the stop, and how many of its frames were empty."""
        if a.quality.empty:
            self._empty_frames += 1
            return
        self._tissue_frames += 1
        if self._best is None or a.quality.focus > self._best[1].quality.focus * (1 + self.cfg.improve_eps):
            self._best = (frame, a)
            self._since_improve = 0
        else:
            self._since_improve += 1

    def _decide(self, frame: Frame, a: Analysis) -> FovEvent | None:
        cfg = self.cfg
        timeout = self._waited >= cfg.max_wait_frames
        if self._best is None or (timeout and self._mostly_empty()):  # nothing (or next to nothing) in view
            if self._waited >= cfg.settle_frames:
                self._done = True
                self.skipped_empty += 1
            return None
        if self._since_improve < cfg.settle_frames and not timeout:
            return None  # focus still improving: wait for the peak
        best_focus = self._best[1].quality.focus
        use_current = not a.quality.empty and a.quality.focus >= cfg.focus_relative * best_focus
        cand_frame, cand = (frame, a) if use_current else self._best
        if not self._sharp(cand.quality):
            if timeout:
                self._done = True
                self.skipped_blurred += 1
            return None  # blurred: the operator may still be focusing
        if (not timeout and self._since_improve < cfg.plateau_frames
                and self.history.relative(cand.quality.focus_norm) < cfg.focus_relative):
            return None  # a pause in focusing, or a field less sharp than the recent ones: see if it improves
        return self._event(cand_frame, cand, "timeout" if timeout else "peak")

    def flush(self) -> FovEvent | None:
        """The stream ended while the stage was still on a stop not yet captured: that stop's best frame if
        it is sharp enough (reason "end"), else None. Call once, after the last frame."""
        if self.state == "still" and not self._done:
            return self._emit_best("end")
        return None

    def _emit_best(self, reason: str) -> FovEvent | None:
        """The stage leaves a still stop that has not been captured: take its best frame if good."""
        if self._best is None or self._mostly_empty():
            self.skipped_empty += 1
            return None
        if not self._sharp(self._best[1].quality):
            self.skipped_blurred += 1
            return None
        return self._event(*self._best, reason)

    def _mostly_empty(self) -> bool:
        """Most frames of the stop were empty: the few with tissue are the edge of the field the stage left
        (or is about to reach) while easing in or out, on a featureless view where motion is hard to see.
        Such a stop is empty, not a blurred field."""
        return self._empty_frames > self._tissue_frames

    def _sharp(self, q: FrameQuality) -> bool:
        return q.focus >= self.cfg.focus_floor and self.history.relative(q.focus_norm) >= self.cfg.focus_min_recent

    def _event(self, frame: Frame, a: Analysis, reason: str) -> FovEvent:
        self._done = True
        self.captured += 1
        best = self._best[1].quality.focus if self._best else a.quality.focus
        return FovEvent(frame=frame, stop=self.stop, quality=a.quality,
                        relative_focus=a.quality.focus / best if best > 0 else 1.0,
                        reason=reason, waited_frames=self._waited)

    @property
    def drift(self) -> np.ndarray:
        """(dx, dy) frame px the field has moved since the stage stopped (zero while moving)."""
        return self._drift.copy()

    def stats(self) -> dict:
        return {"state": self.state, "stops": self.stop, "captured": self.captured,
                "skipped_empty": self.skipped_empty, "skipped_blurred": self.skipped_blurred}
