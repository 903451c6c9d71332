"""Overlays for the live view and the annotated video: boxes coloured by Bethesda category, a status bar.

    overlay = draw_overlay(preview.image, preview.detections, classes, bethesda=manifest.bethesda,
                           scale=preview.scale, grade=last_fov.grade, focus=0.93, fps=29.7, state="still")

Detections are in frame pixels; `scale` maps them onto the image drawn on (preview px per frame px).
The image is copied, never drawn on in place. Every overlay carries the research-use notice.
"""
from __future__ import annotations

import cv2
import numpy as np

from cyto_edge import DISCLAIMER
from cyto_edge.runtime.decode import Detections

# BGR per Bethesda category (organisms are NILM: green); unknown categories grey
COLOURS = {"NILM": (80, 200, 80), "ASC-US": (0, 220, 255), "LSIL": (0, 160, 255), "ASC-H": (0, 90, 255),
           "AGC": (255, 120, 0), "HSIL": (40, 40, 230), "SCC": (200, 0, 200)}
GREY = (170, 170, 170)
FONT = cv2.FONT_HERSHEY_SIMPLEX
MAX_LABELS = 20          # boxes labelled with their class and score (the most confident ones)


def _grade_text(grade) -> tuple[str, tuple]:
    """A FovGrade, a dict with "grade"/"suspicion", or a category name -> (text, colour)."""
    if grade is None:
        return "", GREY
    name = grade if isinstance(grade, str) else (grade.get("grade") if isinstance(grade, dict)
                                                  else getattr(grade, "grade", str(grade)))
    susp = None if isinstance(grade, str) else (grade.get("suspicion") if isinstance(grade, dict)
                                                else getattr(grade, "suspicion", None))
    text = f"FOV {name}" + (f"  suspicion {susp:.2f}" if susp is not None else "")
    return text, COLOURS.get(name, GREY)


def draw_overlay(frame_bgr: np.ndarray, detections: Detections | None, classes, *, grade=None, focus=None,
                 fps=None, state=None, scale: float = 1.0, bethesda: dict | None = None) -> np.ndarray:
    """A copy of `frame_bgr` (H, W, 3) uint8 with the boxes and a status bar."""
    out = np.array(frame_bgr, dtype=np.uint8, copy=True)
    H, W = out.shape[:2]
    thick = max(1, round(max(H, W) / 640))
    fs = max(0.35, max(H, W) / 1800)
    if detections is not None and len(detections):
        boxes = np.round(detections.boxes * scale).astype(np.int32)          # (K, 4) xyxy image px
        order = np.argsort(-detections.scores, kind="stable")
        for rank, i in enumerate(order[::-1]):                             # most confident drawn last (on top)
            name = classes[int(detections.labels[i])] if classes is not None else str(int(detections.labels[i]))
            colour = COLOURS.get((bethesda or {}).get(name, ""), GREY)
            x1, y1, x2, y2 = (int(v) for v in boxes[i])
            cv2.rectangle(out, (x1, y1), (x2, y2), colour, thick, cv2.LINE_AA)
            if len(order) - rank <= MAX_LABELS:
                cv2.putText(out, f"{name} {float(detections.scores[i]):.2f}", (x1, max(y1 - 3, 10)), FONT, fs,
                            colour, max(1, thick - 1), cv2.LINE_AA)
    _status_bar(out, grade, focus, fps, state, fs, thick)
    return out


def _status_bar(out: np.ndarray, grade, focus, fps, state, fs: float, thick: int) -> None:
    H, W = out.shape[:2]
    bar = int(28 * fs / 0.5)
    cv2.rectangle(out, (0, 0), (W, bar), (0, 0, 0), -1)
    text, colour = _grade_text(grade)
    parts = [p for p in (state, None if focus is None else f"focus {float(focus):.2f}",
                         None if fps is None else f"{float(fps):.1f} fps") if p]
    x = 6
    if text:
        cv2.putText(out, text, (x, int(bar * 0.72)), FONT, fs, colour, thick, cv2.LINE_AA)
        x += cv2.getTextSize(text, FONT, fs, thick)[0][0] + 16
    cv2.putText(out, "  ".join(parts), (x, int(bar * 0.72)), FONT, fs, (235, 235, 235), max(1, thick - 1),
                cv2.LINE_AA)
    note = DISCLAIMER
    cv2.putText(out, note, (6, H - 6), FONT, fs * 0.8, (255, 255, 255), max(1, thick - 1) + 1, cv2.LINE_AA)
    cv2.putText(out, note, (6, H - 6), FONT, fs * 0.8, (40, 40, 40), max(1, thick - 1), cv2.LINE_AA)
