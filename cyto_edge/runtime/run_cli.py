"""What `cyto-edge run` does: open the bundle, the source and the outputs, drive a LiveRunner, summarise.

The outputs are callbacks of the runner: the annotated video (cv2.VideoWriter, the overlay of every
previewed frame), the JSON lines (one per graded FOV, written by the grading worker), the console lines
and the optional window. The final line of the JSON lines file is {"summary": slide summary, "stats": ...}.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from cyto_edge.errors import BadInput

EVERY_SCHEMES = ("folder",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class RunOptions:
    bundle: Path
    source: str | None = None
    profile: Path | None = None
    engine: str | None = None
    precision: str | None = None
    threads: int | None = None
    out: Path | None = None
    jsonl: Path | None = None
    show: bool = False
    max_frames: int | None = None
    um_per_px: float | None = None
    fov: str = "auto"
    json_out: bool = False


def source_um_per_px(source) -> float | None:
    """The scale a source knows about itself (synth://: the slide's)."""
    v = getattr(source, "um_per_px", None)
    if v:
        return float(v)
    params = getattr(getattr(source, "slide", None), "params", None)
    return float(params.um_per_px) if params is not None and getattr(params, "um_per_px", None) else None


def grade_every_frame(mode: str, uri: str) -> bool:
    if mode not in ("auto", "tracker", "every"):
        raise BadInput(f"--fov {mode!r}: choose auto, tracker or every")
    if mode != "auto":
        return mode == "every"
    from cyto_edge.runtime.sources import scheme_of

    scheme = scheme_of(uri)
    path = urlparse(uri).path if "://" in uri else uri
    return scheme in EVERY_SCHEMES or (scheme == "file" and path.lower().endswith(IMAGE_SUFFIXES))


class VideoOut:
    """The annotated video: opened at the first overlay, every frame resized to that first size."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = Path(path), float(fps) if fps and fps > 0 else 30.0
        self.writer = None
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, img) -> None:
        import cv2

        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.size = (img.shape[1] // 2 * 2, img.shape[0] // 2 * 2)   # even sizes for H.264-class codecs
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            if not self.writer.isOpened():
                raise BadInput(f"{self.path}: cannot open a video writer (mp4v); is the directory writable?")
        if (img.shape[1], img.shape[0]) != self.size:
            img = cv2.resize(img, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(img)
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


class Window:
    """`--show`: an OpenCV window when there is a display and a GUI-enabled OpenCV; else one clear message."""

    def __init__(self, console, stop: threading.Event):
        self.ok, self.stop = False, stop
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            console.print("[yellow]--show:[/] no display here (DISPLAY is not set); running without a window")
            return
        import cv2

        try:
            cv2.namedWindow("cyto-edge", cv2.WINDOW_NORMAL)
            self.ok = True
        except cv2.error:
            console.print("[yellow]--show:[/] this OpenCV has no GUI (opencv-python-headless); install "
                          "opencv-python to show a window; running without one")

    def show(self, img) -> None:
        if self.ok:
            import cv2

            cv2.imshow("cyto-edge", img)
            if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                self.stop.set()

    def close(self) -> None:
        if self.ok:
            import cv2

            cv2.destroyAllWindows()


def open_run_source(o: RunOptions, profile):
    from cyto_edge.runtime.sources import open_source

    if o.source:
        return o.source, open_source(o.source)
    if profile is None:
        raise BadInput("run: give --source URI (or --profile with a camera)")
    from cyto_edge.runtime.profile import camera_uri, open_camera

    return camera_uri(profile), open_camera(profile)


def run_bundle(o: RunOptions) -> int:
    """Run and summarise; returns the exit code (0, or 130 after Ctrl-C)."""
    from rich.console import Console

    from cyto_edge.runtime.bundle import Bundle
    from cyto_edge.runtime.fov import FovConfig, FovTracker
    from cyto_edge.runtime.pipeline import build_pipeline
    from cyto_edge.runtime.profile import check_against_bundle, load_profile

    console = Console(stderr=True)
    profile = load_profile(o.profile) if o.profile else None
    bundle = Bundle.open(o.bundle)
    if profile is not None:
        for w in check_against_bundle(profile, bundle.manifest, str(o.profile)):
            console.print(f"[yellow]warning:[/] {w}")
    if o.fov not in ("auto", "tracker", "every"):
        raise BadInput(f"--fov {o.fov!r}: choose auto, tracker or every")
    uri, source = open_run_source(o, profile)
    try:
        every = grade_every_frame(o.fov, uri)
        um = o.um_per_px or (profile.camera.um_per_px if profile else None) or source_um_per_px(source)
        from cyto_edge.runtime.live import is_live

        # a live source shares the cores between preview and grading: no busy-waiting engine threads
        # (the profile's engine.spin_wait when there is one)
        spin = None if profile is not None else (False if is_live(source) else None)
        pipe = build_pipeline(bundle, profile=profile, backend=o.engine, precision=o.precision, threads=o.threads,
                              camera_um_per_px=um, spin_wait=spin)
        for w in pipe.warnings:
            console.print(f"[yellow]warning:[/] {w}")
        tracker = FovTracker(profile.pipeline.fov_config() if profile else FovConfig())
        return _drive(o, bundle, pipe, source, tracker, every, console)
    finally:
        source.close()


def _drive(o: RunOptions, bundle, pipe, source, tracker, every: bool, console) -> int:
    from cyto_edge.runtime.grading import summarize_slide
    from cyto_edge.runtime.live import LiveRunner

    stop = threading.Event()
    video = VideoOut(o.out, getattr(source, "fps", None) or 30.0) if o.out else None
    window = Window(console, stop) if o.show else None
    lines = open(o.jsonl, "w") if o.jsonl else None
    grades: dict = {}

    def on_preview(frame, result, overlay):
        if video is not None:
            video.write(overlay)
        if window is not None:
            window.show(overlay)

    def on_fov(event, res):
        grades[res.fov_id] = res.grade
        rec = {**res.to_dict(bundle.classes), "frame_index": event.frame.index, "stop": event.stop,
               "reason": event.reason, "source_meta": {k: v for k, v in event.frame.meta.items()
                                                       if isinstance(v, (int, float, str, bool, type(None)))}}
        if lines is not None:
            lines.write(json.dumps(rec, default=str) + "\n")
            lines.flush()
        if not o.json_out:
            console.print(f"FOV {res.fov_id}: [bold]{res.grade.grade}[/] suspicion {res.grade.suspicion:.2f}, "
                          f"{len(res.detections)} detections, squamous {res.squamous_count}, "
                          f"{res.timings.get('total', 0):.0f} ms")

    def on_state(state, info):
        if state in ("lost", "engine_error", "callback_error") and not o.json_out:
            console.print(f"[yellow]{state}[/] {info.get('error') or info.get('state') or ''}")

    runner = LiveRunner(source, pipe, tracker, on_preview=on_preview, on_fov=on_fov, on_state=on_state,
                        grade_every_frame=every, overlay=True)
    code = 0
    try:
        stats = runner.run(max_frames=o.max_frames, stop_event=stop)
    except KeyboardInterrupt:
        code, stats = 130, runner.stats()
    finally:
        if video is not None:
            video.close()
        if window is not None:
            window.close()
    summary = {"summary": summarize_slide(grades, pipe.policy).to_dict(), "stats": stats,
               "bundle_sha": pipe.bundle_sha, "video": str(o.out) if o.out else None,
               "video_frames": video.frames if video else 0}
    if lines is not None:
        lines.write(json.dumps(summary, default=str) + "\n")
        lines.close()
    _report(summary, o, console)
    return code


def _report(summary: dict, o: RunOptions, console) -> None:
    if o.json_out:
        from cyto_edge._cli_util import print_json

        print_json(summary)
        return
    s, st = summary["summary"], summary["stats"]
    console.print(f"{st['frames']} frames at {st['fps']} fps, {st['fovs']['graded']} FOVs graded "
                  f"({st['fovs']['dropped']} dropped), worst grade [bold]{s['worst_grade']}[/], "
                  f"adequacy {s['adequacy']} ({s['adequacy_reason']})")
    if o.out:
        console.print(f"annotated video: {o.out} ({summary['video_frames']} frames)")
    if o.jsonl:
        console.print(f"FOV results: {o.jsonl}")


def unwrap(text: str) -> str:
    """Command help written wrapped in the source -> one line per paragraph (the help formatter re-wraps
    them); indented example lines stay as they are, in a block the formatter leaves alone."""
    out = []
    for para in text.strip("\n").split("\n\n"):
        lines = para.split("\n")
        if any(line.startswith("    ") for line in lines):
            out.append("\b\n" + "\n".join(lines))
        else:
            out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(out)
