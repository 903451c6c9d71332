"""`cyto-edge bench`: the raw engine next to the pipeline on the same tiled frames, one engine, one thread budget.

    raw       engine.infer on the frames' tiles, pre-normalized outside the clock, in the pipeline's batches
    detect    Pipeline.detect: rescale, tile, normalize, infer, decode, merge (the grading path's detector)
    grade     Pipeline.grade: detect + squamous count, grading, second stages (the frame's quality is
              measured by the FOV tracker on every frame and handed over, as in the live loop)
    preview   Pipeline.preview on each frame
    live      a short LiveRunner run on the source (frames dropped, capture-to-overlay latency)

raw, detect and grade alternate frame by frame (the ratio is then robust to a machine whose load changes
during the run). Throughput is tiles/s (the same tiles on both sides) and FOV/s. CPU is the process's CPU
time over wall time (100% = one core busy), RSS from psutil.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from cyto_edge.errors import BadInput


def capture(source, n: int, max_reads: int | None = None) -> list[np.ndarray]:
    """The first `n` frames (H, W, 3) uint8 BGR of an open source (None frames skipped)."""
    frames, reads = [], 0
    while len(frames) < n and reads < (max_reads or 50 * n):
        f = source.read()
        reads += 1
        if f is None:
            if getattr(source, "state", "") == "ended":
                break
            continue
        frames.append(f.image)
    if not frames:
        raise BadInput(f"{getattr(source, 'uri', 'source')}: gave no frame to benchmark")
    return frames


def tile_batches(pipeline, frame: np.ndarray) -> list[np.ndarray]:
    """The normalized (b, 3, S, S) batches the grading path feeds the engine for this frame."""
    from cyto_edge.runtime.decode import tile_grid
    from cyto_edge.runtime.tiling import TileBatcher, rescale

    img = rescale(frame, pipeline.factor)
    grid = tile_grid(img.shape[0], img.shape[1], pipeline.size, pipeline.overlap)
    i = pipeline.manifest.input
    tb = TileBatcher(pipeline.size, pipeline.batch_size, i.mean, i.std, i.scale, pipeline.channels)
    bs = pipeline.batch_size
    return [tb.fill(img, grid.tiles[s:s + bs]).copy() for s in range(0, len(grid.tiles), bs)]


def _pcts(values) -> dict:
    a = np.asarray(values, np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p95": round(float(np.percentile(a, 95)), 3)} if a.size else {}


def _stages(timings: list[dict]) -> dict:
    keys = sorted({k for t in timings for k in t})
    return {k: _pcts([t.get(k, 0.0) for t in timings]) for k in keys}


def compare(pipeline, frames: list[np.ndarray], repeats: int = 1, grade: bool = True) -> dict:
    """raw vs detect (vs grade), alternating per frame; one warm-up pass first."""
    from cyto_edge.runtime.quality import analyze

    batches = [tile_batches(pipeline, f) for f in frames]
    quality = [analyze(f).quality.to_dict() for f in frames]   # measured per frame by the FOV tracker, not here
    n_tiles = sum(b.shape[0] for bs in batches for b in bs)
    for b in batches[0]:                                      # warm-up: first calls allocate
        pipeline.infer(b)
    pipeline.detect(frames[0])
    raw_s = det_s = grade_s = 0.0
    raw_batch_ms, det_t, grade_t = [], [], []
    for _ in range(repeats):
        for f, bs, q in zip(frames, batches, quality):
            t0 = time.perf_counter()
            for b in bs:
                t = time.perf_counter()
                pipeline.infer(b)
                raw_batch_ms.append((time.perf_counter() - t) * 1e3)
            raw_s += time.perf_counter() - t0
            tm: dict = {}
            t0 = time.perf_counter()
            pipeline.detect(f, timings=tm)
            det_s += time.perf_counter() - t0
            det_t.append(tm)
            if grade:
                t0 = time.perf_counter()
                r = pipeline.grade(f, quality=q)
                grade_s += time.perf_counter() - t0
                grade_t.append(r.timings)
    tiles = n_tiles * repeats
    out = {"tiles_per_frame": round(n_tiles / len(frames), 2), "frames": len(frames) * repeats,
           "raw": {"tiles_per_s": round(tiles / raw_s, 2), "batch_ms": _pcts(raw_batch_ms)},
           "detect": {"tiles_per_s": round(tiles / det_s, 2), "fov_per_s": round(len(frames) * repeats / det_s, 3),
                      "stages_ms": _stages(det_t)},
           "ratio_detect_vs_raw": round(raw_s / det_s, 4)}
    if grade:
        out["grade"] = {"fov_per_s": round(len(frames) * repeats / grade_s, 3), "stages_ms": _stages(grade_t)}
    return out


def preview_stats(pipeline, frames: list[np.ndarray], rounds: int = 3) -> dict:
    pipeline.preview(frames[0])
    ts, n = [], []
    for _ in range(rounds):
        for f in frames:
            r = pipeline.preview(f)
            ts.append(r.timings)
            n.append(len(r.detections))
    pre_post = [t.get("preprocess", 0) + t.get("decode", 0) for t in ts]
    return {"stages_ms": _stages(ts), "pre_post_ms": _pcts(pre_post), "detections_mean": round(float(np.mean(n)), 2)}


def live_stats(uri: str, pipeline, frames: int) -> dict:
    from cyto_edge.runtime.fov import FovTracker
    from cyto_edge.runtime.live import LiveRunner
    from cyto_edge.runtime.sources import open_source

    with open_source(uri) as src:
        st = LiveRunner(src, pipeline, FovTracker()).run(max_frames=frames)
    return {k: st[k] for k in ("frames", "fps", "live", "latency_ms", "frames_dropped", "fovs", "fov_latency_ms",
                               "still_to_stored_ms")}


def bench_bundle(bundle_path: Path, *, source: str, engine: str | None, precision: str | None, threads: int | None,
                 frames: int, batch: int | None, um_per_px: float | None, live_frames: int, json_out: bool) -> dict:
    import psutil
    from rich.console import Console

    from cyto_edge._cli_util import print_json
    from cyto_edge.runtime.bundle import Bundle
    from cyto_edge.runtime.pipeline import build_pipeline
    from cyto_edge.runtime.run_cli import source_um_per_px
    from cyto_edge.runtime.sources import open_source

    console = Console(stderr=True)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    b = Bundle.open(bundle_path)
    with open_source(source) as src:
        um = um_per_px or source_um_per_px(src)
        imgs = capture(src, frames)
    pipe = build_pipeline(b, backend=engine, precision=precision, threads=threads, camera_um_per_px=um,
                          batch_size=batch)
    if not json_out:
        console.print(f"{len(imgs)} frames {imgs[0].shape[1]}x{imgs[0].shape[0]}, {pipe.engine.name} "
                      f"{pipe.engine.precision}, threads {threads or 'default'}, batch {pipe.batch_size}")
    cpu0, t0 = proc.cpu_times(), time.monotonic()
    result = {"bundle": str(bundle_path), "source": source, "engine": pipe.engine.name,
              "precision": pipe.engine.precision, "threads": threads, "batch": pipe.batch_size,
              "frame": [imgs[0].shape[1], imgs[0].shape[0]], "scale_factor": round(pipe.factor, 4),
              "overlap": pipe.overlap, "load_avg_before": [round(x, 2) for x in os.getloadavg()],
              **compare(pipe, imgs), "preview": preview_stats(pipe, imgs)}
    if live_frames:
        result["live"] = live_stats(source, pipe, live_frames)
    cpu1, el = proc.cpu_times(), time.monotonic() - t0
    result.update({"cpu_percent": round(100 * (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / el, 1),
                   "rss_mb": round(proc.memory_info().rss / 2**20, 1), "rss_start_mb": round(rss0 / 2**20, 1),
                   "load_avg_after": [round(x, 2) for x in os.getloadavg()], "elapsed_s": round(el, 2),
                   "warnings": pipe.warnings})
    if json_out:
        print_json(result)
    else:
        _print(result, console)
    return result


def _print(r: dict, console) -> None:
    console.print(f"raw engine {r['raw']['tiles_per_s']} tiles/s | pipeline {r['detect']['tiles_per_s']} tiles/s "
                  f"(x{r['ratio_detect_vs_raw']}) | {r['detect']['fov_per_s']} FOV/s detect, "
                  f"{r['grade']['fov_per_s']} FOV/s graded | {r['tiles_per_frame']} tiles per frame")
    for name in ("detect", "grade", "preview"):
        st = r[name]["stages_ms"]
        console.print(f"{name:8s} " + "  ".join(f"{k} {v['p50']}/{v['p95']}" for k, v in st.items()) + "  (ms p50/p95)")
    if "live" in r:
        lv = r["live"]
        console.print(f"live: {lv['frames']} frames at {lv['fps']} fps, dropped {lv['frames_dropped']}, latency "
                      f"p95 {lv['latency_ms']['p95']} ms, FOVs {lv['fovs']['graded']}")
    console.print(f"CPU {r['cpu_percent']}%  RSS {r['rss_mb']} MB  load {r['load_avg_after']}")
