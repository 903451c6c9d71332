"""`cyto-edge run` (a bundle on a live or recorded source) and `cyto-edge bench` (engine vs pipeline)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cyto_edge.runtime.run_cli import unwrap

RUN_HELP = """Run a bundle on a camera or a recording: live boxes, FOVs graded once, JSON lines, annotated video.

Every frame gets the preview path (downscaled, boxes drawn); a field of view is graded once, at full
resolution and tiled at the model's scale, when the stage is still, the field sharp and not empty
(--fov tracker, the default for cameras, videos and synth://). --fov every grades every frame: the default
for folder:// (a folder of FOV images) and single images. Live sources (cameras, streams, synth:// in real
time) always show the newest frame; recordings are processed frame by frame, every FOV graded.

    cyto-edge run model.cytobundle --source "synth://?realtime=0&stops=6" --jsonl fovs.jsonl --out run.mp4
    cyto-edge run model.cytobundle --source file:///data/slide.mp4 --um-per-px 0.31 --out annotated.mp4
    cyto-edge run model.cytobundle --profile firmware_configs/desktop-cpu.yaml --show

--jsonl writes one line per graded FOV (grade, counts, suspicion, top detections, quality, timings) and a
final {"summary": ...} line (slide summary with the adequacy verdict, and run statistics). The camera's
µm/px comes from --um-per-px, else the profile, else the source (synth://), else the model's own scale.
"""

BENCH_HELP = """Raw engine vs the pipeline on the same tiled frames, per-stage timings, CPU and memory, as JSON.

Frames are captured from --source (default: synth:// at 2028x1520), tiled as the grading path tiles them,
and measured alternately, frame by frame, with the same engine and thread budget: the raw engine on the
frames' pre-normalized tile batches (tiles/s at the pipeline's batch), the detection pipeline (rescale,
tile, normalize, infer, decode, merge) and the full grade (plus quality, counting, grading, second stages).
Then the preview path on each frame, and a short live run through LiveRunner (frames dropped, capture-to-
overlay latency). Load average is recorded: on a shared machine, compare ratios, not absolute figures.

    cyto-edge bench model.cytobundle --engine openvino --threads 2 --frames 6 --json
"""

def register(app: typer.Typer) -> None:
    @app.command("run", help=unwrap(RUN_HELP))
    def run(
        bundle: Path = typer.Argument(..., help="Bundle (.cytobundle directory, .zip or .tar)."),
        source: Optional[str] = typer.Option(None, "--source", help="synth://, file://, folder://, v4l2://0, rtsp://, "
                                             "gst://, picam2://0 (default: the profile's camera)."),
        profile: Optional[Path] = typer.Option(None, "--profile", help="Device profile YAML (camera, engine, "
                                               "pipeline, grading)."),
        engine: Optional[str] = typer.Option(None, "--engine", help="onnxruntime | openvino | tensorrt."),
        precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | fp16 | int8 (default: fp32 "
                                                "when the bundle has it)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Engine threads."),
        out: Optional[Path] = typer.Option(None, "--out", help="Annotated video (.mp4)."),
        jsonl: Optional[Path] = typer.Option(None, "--jsonl", help="One JSON line per graded FOV, then a summary."),
        show: bool = typer.Option(False, "--show", help="Show the live view in a window (needs a display)."),
        max_frames: Optional[int] = typer.Option(None, "--max-frames", help="Stop after N frames."),
        um_per_px: Optional[float] = typer.Option(None, "--um-per-px", help="Camera µm per pixel."),
        fov: str = typer.Option("auto", "--fov", help="auto | tracker | every (see above)."),
        json_out: bool = typer.Option(False, "--json", help="Print the final summary as JSON."),
    ):
        from cyto_edge.runtime.run_cli import RunOptions, run_bundle

        code = run_bundle(RunOptions(bundle, source, profile, engine, precision, threads, out, jsonl, show,
                                     max_frames, um_per_px, fov, json_out))
        if code:
            raise typer.Exit(code)

    @app.command("bench", help=unwrap(BENCH_HELP))
    def bench(
        bundle: Path = typer.Argument(..., help="Bundle (.cytobundle directory, .zip or .tar)."),
        source: str = typer.Option("synth://?realtime=0&width=2028&height=1520&stops=4", "--source",
                                   help="Where the frames come from."),
        engine: Optional[str] = typer.Option(None, "--engine", help="onnxruntime | openvino | tensorrt."),
        precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | fp16 | int8."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Engine threads (both sides)."),
        frames: int = typer.Option(6, "--frames", min=1, help="Frames measured (each side)."),
        batch: Optional[int] = typer.Option(None, "--batch", help="Tiles per engine call (default 8)."),
        um_per_px: Optional[float] = typer.Option(None, "--um-per-px", help="Camera µm per pixel."),
        live_frames: int = typer.Option(60, "--live-frames", min=0, help="Frames of the live run (0: skip)."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON only."),
    ):
        from cyto_edge.runtime.bench import bench_bundle

        bench_bundle(bundle, source=source, engine=engine, precision=precision, threads=threads, frames=frames,
                     batch=batch, um_per_px=um_per_px, live_frames=live_frames, json_out=json_out)
