"""Runtime pipeline targets (issue 7), measured in one run on this CPU, engine and pipeline on the same threads.

  grading   tiled 2028x1520 synth:// frames: detection pipeline throughput (rescale, tile, normalize, infer,
            decode, merge) / raw engine throughput on the same tiles (target >= 0.9; `ratio_serial`: the same
            without the helper thread that tiles and decodes while the engine runs), and FOV/s of the INT8
            student on 2 cores (target >= 5), at the model's scale (synth, 1 µm/px) and with the Raspberry Pi
            HQ camera's geometry (0.31 µm/px: the frame is 629x471 at the model's scale)
  preview   pre + post-processing per 1024x1024 frame at the model's input size (target <= 0.5 ms):
            resize + normalize, decode + boxes to frame px, on the student's real outputs and on raw outputs
            with 10 and 30 detections
  latency   LiveRunner on synth:// at 30 fps (1280x960): capture-to-overlay p95 (target <= 2 frame periods,
            66.7 ms), still-to-stored FOV (target <= 1 s), frames dropped, FOVs against the stop schedule
  memory    RSS over a live run looping the stage: growth after warm-up (target <= 5%); 10 minutes, 2 with --small

The model: the CPU student recipe trained and exported (INT8 QDQ + OpenVINO IR) once and cached
(benchmarks/_export_model.py, _cache.py); --bundle measures another bundle. The machine may be shared:
each line records the load average before and after its measurement.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
from _cache import cached
from _common import emit, parser

THREADS = 2
PI_HQ_UM = 0.31       # firmware_configs/raspberry-pi-5.yaml


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def student_bundle(small: bool) -> tuple[Path, dict]:
    """(bundle dir, how the student was trained): INT8 QDQ + OpenVINO IR of the cached CPU student."""
    from _export_model import settings, trained_student

    _, ckpt, train = trained_student(settings(small), threads=THREADS)
    key = {"what": "pipeline-bench-bundle", "ckpt": str(ckpt), "target": "openvino", "precision": "int8"}

    def build(d: Path) -> None:
        import torch

        from cyto_edge.export.pipeline import ExportOptions, export_bundle

        torch.set_num_threads(THREADS)
        export_bundle(ckpt, ExportOptions(target="openvino", precision="int8", out=d / "student.cytobundle",
                                          calib_images=32, val_images=4, threads=THREADS),
                      show_progress=False, check=False)

    return cached(key, build, kind="bundle") / "student.cytobundle", train


def stop_frames(uri: str, n: int) -> list[np.ndarray]:
    """One sharp frame per non-empty stop of a synth:// stage (full resolution BGR)."""
    from cyto_edge.runtime.sources import open_source

    out, seen = [], set()
    with open_source(uri) as src:
        for f in iter(src.read, None):
            sid = f.meta["stop_id"]
            if sid is not None and f.meta["sharp"] and not f.meta["empty"] and sid not in seen:
                seen.add(sid)
                out.append(f.image)
                if len(out) == n:
                    break
    return out


def engines(bundle) -> list[tuple[str, str]]:
    """(backend, precision) measured: INT8 on OpenVINO and ONNX Runtime when the bundle has it, fp32 on
    ONNX Runtime; the first one is used for the preview, latency and memory groups."""
    have = {f.precision for f in bundle.manifest.files if f.role == "detector"}
    out = [("onnxruntime", "fp32")]
    if "int8-qdq" in have:
        out = [("openvino", "int8"), ("onnxruntime", "int8"), *out]
    return out


def overhead(pipe, frames) -> dict:
    """The pipeline's own work per tile (rescale, tiles, normalize, decode, merge) with the engine's outputs
    replayed: wall and thread-CPU ms, robust to a shared machine's load."""
    rec, real = [], pipe.infer
    pipe.infer = lambda x: rec.append(real(x)) or rec[-1]
    for f in frames:
        pipe.detect(f)
    wall = cpu = 0.0
    for _ in range(3):
        replay = iter(rec)
        pipe.infer = lambda x: next(replay)
        for f in frames:
            w, c = time.perf_counter(), time.thread_time()
            pipe.detect(f)
            wall, cpu = wall + time.perf_counter() - w, cpu + time.thread_time() - c
    del pipe.infer
    n = 3 * sum(o[0].shape[0] for o in rec)                         # tiles processed
    return {"pipeline_only_ms_per_tile": round(1e3 * wall / n, 4), "pipeline_only_cpu_ms_per_tile": round(1e3 * cpu / n, 4)}


def grading(bundle, small: bool) -> dict:
    from cyto_edge.runtime.bench import compare
    from cyto_edge.runtime.pipeline import build_pipeline

    frames = stop_frames("synth://?realtime=0&width=2028&height=1520&stops=6&fps=10", 2 if small else 4)
    figures = {}
    for backend, precision in engines(bundle):
        for scale, name in ((1.0, "model_scale"), (PI_HQ_UM, "pi_hq")):
            pipe = build_pipeline(bundle, backend=backend, precision=precision, threads=THREADS,
                                  camera_um_per_px=scale)
            before = load()
            r = compare(pipe, frames, repeats=1 if small and scale == 1.0 else 3)
            pipe.overlap_tiles = False          # the serial path (eval's), same engine, for comparison
            serial = compare(pipe, frames, repeats=1 if small and scale == 1.0 else 3, grade=False)
            ov = overhead(pipe, frames)
            pipe.overlap_tiles = True
            figures[f"{backend}_{precision}_{name}"] = {
                **ov, "raw_ms_per_tile": round(1e3 / r["raw"]["tiles_per_s"], 4),
                "tiles_per_frame": r["tiles_per_frame"], "raw_tiles_per_s": r["raw"]["tiles_per_s"],
                "pipeline_tiles_per_s": r["detect"]["tiles_per_s"], "ratio": r["ratio_detect_vs_raw"],
                "ratio_serial": serial["ratio_detect_vs_raw"],
                "detect_fov_per_s": r["detect"]["fov_per_s"], "graded_fov_per_s": r["grade"]["fov_per_s"],
                "detect_stages_ms_p50": {k: v["p50"] for k, v in r["detect"]["stages_ms"].items()},
                "grade_stages_ms_p50": {k: v["p50"] for k, v in r["grade"]["stages_ms"].items()},
                "load_before": before, "load_after": load()}
            pipe.engine.close()
    return figures


def fake_outputs(rng, num_priors: int, num_classes: int, k: int):
    """Raw outputs with about k detections: background confident except on k priors (SSD-like)."""
    loc = rng.normal(0.0, 0.3, (1, num_priors, 4)).astype(np.float32)
    logits = rng.normal(0.0, 1.0, (1, num_priors, num_classes + 1)).astype(np.float32)
    logits[..., 0] = rng.normal(8.0, 0.5, num_priors)
    pos = rng.choice(num_priors, k, replace=False)
    logits[0, pos, rng.integers(1, num_classes + 1, k)] = logits[0, pos, 0] + rng.uniform(1.0, 4.0, k)
    return loc, logits


def preview(bundle, small: bool) -> dict:
    import cv2

    from cyto_edge.runtime.decode import Tile
    from cyto_edge.runtime.pipeline import build_pipeline
    from cyto_edge.runtime.tiling import decode_tiles

    backend, precision = engines(bundle)[0]
    pipe = build_pipeline(bundle, backend=backend, precision=precision, threads=THREADS, camera_um_per_px=1.0)
    frames = stop_frames("synth://?realtime=0&width=1024&height=1024&stops=6&fps=10", 3)
    rounds = 100 if small else 400
    before = load()
    t, n = [], []
    for i in range(rounds + 10):
        r = pipe.preview(frames[i % len(frames)])
        if i >= 10:
            t.append(r.timings)
            n.append(len(r.detections))
    pre = np.array([x["preprocess"] for x in t])
    post = np.array([x["decode"] for x in t])
    fig = {"frame": [1024, 1024], "input": pipe.size, "detections_mean": float(np.mean(n)),
           "pre_ms_p50": float(np.median(pre)), "post_ms_p50": float(np.median(post)),
           "pre_post_ms_p50": float(np.median(pre + post)), "pre_post_ms_p95": float(np.percentile(pre + post, 95)),
           "downscale_for_display_ms_p50": float(np.median([x["downscale"] for x in t])),
           "infer_ms_p50": float(np.median([x["infer"] for x in t]))}
    rng = np.random.default_rng(0)
    P, C = len(pipe.priors), len(pipe.classes)
    eng = pipe.preview_engine or pipe
    for k in (10, 30):                 # raw outputs with k detections, decoded as the live loop does: right
        outs = [fake_outputs(rng, P, C, k) for _ in range(8)]     # after an inference (cold caches)
        ms, dets = [], []
        for i in range(rounds):
            eng.infer(pipe.preview_input(frames[i % len(frames)])[0])
            fresh = tuple(o.copy() for o in outs[i % 8])             # new output arrays, as an engine's
            t0 = time.perf_counter()
            d = decode_tiles(fresh, pipe.priors, pipe.variances, pipe.size, pipe.cfg)[0]
            d = d.shifted(0, 0, 3.2)                                     # model px -> 1024 px frame
            ms.append((time.perf_counter() - t0) * 1e3)
            dets.append(len(d))
        fig[f"post_ms_p50_{k}_dets"] = float(np.median(ms))
        fig[f"detections_{k}"] = float(np.mean(dets))
        fig[f"pre_post_ms_p50_{k}_dets"] = float(np.median(pre) + np.median(ms))
    cpu_pre, cpu_post = [], []                         # thread CPU time of the same calls (robust to load)
    for i in range(rounds):
        f = frames[i % len(frames)]
        c = time.thread_time()
        batch, size = pipe.preview_input(f)
        c1 = time.thread_time()
        outs = (pipe.preview_engine or pipe).infer(batch)
        c2 = time.thread_time()
        pipe.preview_decode(outs, size, f.shape[1])
        cpu_pre.append((c1 - c) * 1e3)
        cpu_post.append((time.thread_time() - c2) * 1e3)
    fig.update({"pre_cpu_ms_p50": float(np.median(cpu_pre)), "post_cpu_ms_p50": float(np.median(cpu_post)),
                "pre_post_cpu_ms_p50": float(np.median(np.add(cpu_pre, cpu_post)))})
    # the target's setting: frames already at the model's input size (no resampling), realistic counts
    S = pipe.size
    small_frames = [cv2.resize(f, (S, S), interpolation=cv2.INTER_AREA) for f in frames]
    at_pre, at_pre_cpu, at_post, at_n = [], [], [], []
    for i in range(rounds):
        f = small_frames[i % len(small_frames)]
        t0, c0 = time.perf_counter(), time.thread_time()
        batch, size = pipe.preview_input(f)
        at_pre.append((time.perf_counter() - t0) * 1e3)
        at_pre_cpu.append((time.thread_time() - c0) * 1e3)
        outs = (pipe.preview_engine or pipe).infer(batch)
        t0 = time.perf_counter()
        at_n.append(len(pipe.preview_decode(outs, size, S)))
        at_post.append((time.perf_counter() - t0) * 1e3)
    at = {"frame": [S, S], "pre_ms_p50": float(np.median(at_pre)), "pre_cpu_ms_p50": float(np.median(at_pre_cpu)),
          "post_ms_p50": float(np.median(at_post)), "detections_mean": float(np.mean(at_n)),
          "pre_post_ms_p50": float(np.median(np.add(at_pre, at_post)))}
    for k in (10, 30):
        at[f"pre_post_ms_p50_{k}_dets"] = float(np.median(at_pre) + fig[f"post_ms_p50_{k}_dets"])
    fig["at_input_size"] = at
    img = frames[0]
    buf = np.empty((320, 320, 3), np.uint8)
    fig["resize_only_ms_p50"] = float(np.median([_time(lambda: cv2.resize(img, (320, 320), dst=buf)) for _ in range(200)]))
    fig["normalize_only_ms_p50"] = float(np.median([_time(lambda: pipe._batcher(1).fill(buf, [Tile(0, 0, 320, 320)]))
                                                    for _ in range(200)]))
    fig.update({"engine": f"{backend} {precision}", "load_before": before, "load_after": load()})
    pipe.engine.close()
    return fig


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def live_run(bundle, uri: str, seconds: float | None, sample_s: float = 5.0):
    """A LiveRunner on `uri`, for `seconds` (None: to the end), RSS sampled every `sample_s`."""
    import psutil

    from cyto_edge.runtime.fov import FovTracker
    from cyto_edge.runtime.live import LiveRunner
    from cyto_edge.runtime.pipeline import build_pipeline
    from cyto_edge.runtime.sources import open_source

    backend, precision = engines(bundle)[0]
    pipe = build_pipeline(bundle, backend=backend, precision=precision, threads=THREADS, camera_um_per_px=1.0,
                          spin_wait=False)          # as the device profiles run it live
    fovs, rss, stop = [], [], threading.Event()
    proc = psutil.Process()
    with open_source(uri) as src:
        runner = LiveRunner(src, pipe, FovTracker(), on_fov=lambda e, r: fovs.append(e.frame.meta.get("stop_id")))
        th = threading.Thread(target=lambda: runner.run(stop_event=stop), daemon=True)
        t0 = time.monotonic()
        th.start()
        while th.is_alive() and (seconds is None or time.monotonic() - t0 < seconds):
            th.join(sample_s)
            rss.append((round(time.monotonic() - t0, 1), proc.memory_info().rss / 2**20))
        stop.set()
        th.join()
        schedule = src.schedule
    return runner.stats(), fovs, schedule, rss, f"{backend} {precision}"


def latency(bundle, small: bool) -> dict:
    stops = 6 if small else 12
    before = load()
    st, fovs, schedule, _, eng = live_run(bundle, f"synth://?realtime=1&fps=30&width=1280&height=960&stops={stops}",
                                         None)
    non_empty = {s["id"] for s in schedule if not s["empty"]}
    return {"fps_target": 30, "frame_period_ms": 33.3, "latency_ms": st["latency_ms"], "fps": st["fps"],
            "frames": st["frames"], "frames_dropped": st["frames_dropped"],
            "still_to_stored_ms": st["still_to_stored_ms"], "fov_capture_to_stored_ms": st["fov_latency_ms"],
            "fovs_graded": st["fovs"]["graded"], "fovs_dropped": st["fovs"]["dropped"],
            "duplicates": len(fovs) - len(set(fovs)), "missed_non_empty": len(non_empty - set(fovs)),
            "graded_while_moving": sum(f is None for f in fovs), "non_empty_stops": len(non_empty),
            "preview_stage_ms": st["preview_ms"], "engine": eng, "load_before": before, "load_after": load()}


def memory(bundle, small: bool) -> dict:
    seconds = 120 if small else 600
    warm = 30.0 if small else 60.0
    before = load()
    st, fovs, _, rss, eng = live_run(bundle, "synth://?realtime=1&fps=30&width=1280&height=960&stops=8&loop=1",
                                     seconds, sample_s=5.0)
    base = [m for t, m in rss if warm <= t < warm + 20] or [rss[0][1]]
    end = [m for _, m in rss[-3:]]
    growth = (np.median(end) - np.median(base)) / np.median(base)
    return {"seconds": seconds, "warmup_s": warm, "rss_mb_after_warmup": round(float(np.median(base)), 1),
            "rss_mb_end": round(float(np.median(end)), 1), "rss_mb_max": round(max(m for _, m in rss), 1),
            "growth_percent": round(100 * float(growth), 2), "frames": st["frames"], "fovs_graded": len(fovs),
            "rss_samples": [(t, round(m, 1)) for t, m in rss], "engine": eng, "shortened": small,
            "load_before": before, "load_after": load()}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=None, help="Measure this bundle instead of the cached student.")
    p.add_argument("--only", default="grading,preview,latency,memory", help="Comma-separated figure groups.")
    args = p.parse_args()
    import cv2

    from cyto_edge.runtime.bundle import Bundle

    cv2.setNumThreads(1)
    path, train = (args.bundle, {}) if args.bundle else student_bundle(args.small)
    bundle = Bundle.open(path)
    extra = {"bundle": str(path), "student": train, "int8": any(f.precision == "int8-qdq" for f in bundle.manifest.files)}
    groups = {"grading": grading, "preview": preview, "latency": latency, "memory": memory}
    for name in [g.strip() for g in args.only.split(",") if g.strip()]:
        emit(f"pipeline_{name}", groups[name](bundle, args.small), onnxruntime_threads=THREADS,
             openvino_threads=THREADS, opencv_threads=1, **extra)


if __name__ == "__main__":
    main()
