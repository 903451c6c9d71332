"""TensorRT plans, built on the device (`cyto-edge build-engine`) with the TensorRT 10 Python API.

    res = build_engine("cyto.cytobundle", precision="fp16", workspace_mb=1024, dla_core=None)

Steps: lint the ONNX (export/trt_lint.py) -> trt.Builder, create_network (explicit batch is the only
mode in TensorRT 10), OnnxParser -> IBuilderConfig: workspace pool limit, FP16 (and INT8 for the QDQ
file, whose explicit Q/DQ scales replace a calibrator), an optimization profile over the batch
(1 .. max_batch; fixed at max_batch on a DLA), the bundle's timing cache (create_timing_cache /
set_timing_cache, serialized back after the build), optionally a DLA core with GPU fallback ->
build_serialized_network -> `model.<gpu>.<tensorrt>.plan` written atomically into the bundle and
recorded in the manifest (kind trt-plan; meta: gpu, compute capability, TensorRT version, DLA core,
profile). A plan for this GPU built by another TensorRT version is replaced (plans are not portable);
plans for other GPUs stay. The new plan is then checked against ONNX Runtime fp32 (itself verified
against torch at export) with the gate of export/verify.py. Needs TensorRT and pycuda (the jetson extra).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cyto_edge.errors import BadInput, CheckFailed
from cyto_edge.export.trt_lint import check_onnx
from cyto_edge.runtime.bundle import Bundle, atomic_write_bytes


def _parse(trt, builder, logger, onnx_path: Path):
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            node = e.node_name() if hasattr(e, "node_name") else e.node()
            errs.append(f"node {node}: {e.desc()}")
        raise CheckFailed(f"{onnx_path}: TensorRT's ONNX parser failed: {'; '.join(errs[:5]) or 'unknown error'}")
    return network, parser


def _config(trt, builder, network, precision: str, workspace_mb: int, dla_core: int | None, max_batch: int,
            cache_bytes: bytes):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)       # explicit quantization: scales come from the Q/DQ nodes
    inp = network.get_input(0)
    _, c, h, w = inp.shape
    lo = max_batch if dla_core is not None else 1  # DLA engines take a fixed shape
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (lo, c, h, w), (max_batch, c, h, w), (max_batch, c, h, w))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    if dla_core is not None:
        if builder.num_DLA_cores <= dla_core:
            raise BadInput(f"--dla {dla_core}: this device has {builder.num_DLA_cores} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    return config


def build_plan(onnx_path: Path, plan_path: Path, precision: str, *, workspace_mb: int = 1024,
               dla_core: int | None = None, max_batch: int = 8, cache_path: Path | None = None) -> dict:
    """Build and write one serialized plan; returns its manifest meta (profile, DLA, timings)."""
    import time

    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path)
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    config = _config(trt, builder, network, precision, workspace_mb, dla_core, max_batch, cache_bytes)
    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckFailed(f"{onnx_path}: TensorRT could not build a {precision} engine (see the log above); try a "
                          "larger --workspace or another --precision")
    atomic_write_bytes(plan_path, bytes(serialized))
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return {"max_batch": max_batch, "workspace_mb": workspace_mb, "dla_core": dla_core,
            "build_seconds": round(time.monotonic() - t0, 1), "source": onnx_path.name}


def _source(b: Bundle, precision: str) -> Path:
    want = "int8-qdq" if precision == "int8" else "fp32"
    f = b.manifest.file("onnx", want)
    if f is None:
        raise BadInput(f"{b.path}: no {want} ONNX model to build from; export with "
                       f"`cyto-edge export CKPT --target jetson --precision {precision}`")
    return b.path / f.path


def _drop_stale(b: Bundle, info: dict, keep: str) -> list[str]:
    """Remove plans (and timing caches) of this GPU made by another TensorRT version; return their paths."""
    stale = [f for f in b.manifest.files if f.kind in ("trt-plan", "timing-cache") and f.meta.get("gpu") == info["slug"]
             and f.meta.get("tensorrt") != info["tensorrt"] and f.path != keep]
    for f in stale:
        (b.path / f.path).unlink(missing_ok=True)
    b.manifest.files = [f for f in b.manifest.files if f not in stale]
    return [f.path for f in stale]


def build_engine(bundle_dir: str | Path, precision: str = "fp16", *, workspace_mb: int = 1024,
                 dla_core: int | None = None, max_batch: int = 8, device: str = "cuda:0", force: bool = False,
                 check_tiles: np.ndarray | None = None) -> dict:
    """Build (or keep, when up to date) this device's plan in the bundle; returns what was done."""
    from cyto_edge.export.bundle_writer import add_file
    from cyto_edge.runtime.engines.tensorrt import device_index, gpu_info, plan_name

    if precision not in ("fp32", "fp16", "int8"):
        raise BadInput(f"--precision {precision!r} must be fp16, int8 or fp32")
    b = Bundle.open(bundle_dir)
    info = gpu_info(device_index(device))
    rel = plan_name(info)
    current = next((f for f in b.manifest.files if f.path == rel), None)
    if current is not None and current.precision == precision and not force:
        return {"plan": rel, "status": "up to date", "gpu": info}
    src = _source(b, precision)
    check_onnx(src)
    cache_rel = f"trt.{info['slug']}.{info['tensorrt']}.timing-cache"
    meta = build_plan(src, b.path / rel, precision, workspace_mb=workspace_mb, dla_core=dla_core,
                      max_batch=max_batch, cache_path=b.path / cache_rel)
    removed = _drop_stale(b, info, rel)
    tags = {"gpu": info["slug"], "gpu_name": info["name"], "compute_capability": info["compute_capability"],
            "tensorrt": info["tensorrt"]}
    add_file(b.path, b.manifest, cache_rel, "timing-cache", None, **tags)
    add_file(b.path, b.manifest, rel, "trt-plan", precision, **tags, **meta)
    quality = check_plan(b.path, rel, precision, device, check_tiles)
    return {"plan": rel, "status": "built", "gpu": info, "removed": removed, "quality": quality, **meta}


def check_plan(bundle_dir: Path, rel: str, precision: str, device: str, tiles: np.ndarray | None) -> dict:
    """Raw outputs of the new plan against ONNX Runtime fp32 on `tiles` (default: 8 seeded tiles of noise
    around the normalized mean); recorded in quality.files[rel]; CheckFailed outside the tolerance."""
    from cyto_edge.export.verify import TOLERANCES, raw_differences
    from cyto_edge.runtime.engines import load_engine

    b = Bundle.open(bundle_dir)
    H, W = b.input_size
    x = tiles if tiles is not None else np.random.default_rng(0).normal(0, 0.5, (8, 3, H, W)).astype(np.float32)
    with load_engine(b, "onnxruntime", precision="fp32") as ref, \
            load_engine(b, "tensorrt", precision=precision, device=device, file=rel) as eng:
        t = TOLERANCES["int8-qdq" if precision == "int8" else precision]
        diff = raw_differences(list(eng.infer(x)), list(ref.infer(x)), b.manifest.output.all_names(), t.raw_quantile)
    tol = t.raw_rel
    rec = {"precision": precision, "raw_rel_diff": diff, "reference": "onnxruntime fp32", "tiles": len(x),
           "tolerance": {"raw_rel": tol, "raw_quantile": t.raw_quantile}, "passed": all(v <= tol for v in diff.values())}
    b.manifest.quality.setdefault("files", {})[rel] = rec
    b.save()
    if not rec["passed"]:
        raise CheckFailed(f"{b.path / rel}: outputs differ from ONNX Runtime fp32 by {max(diff.values()):.3g} x "
                          f"max |ref| (> {tol:g}); the plan is recorded but should not be used")
    return rec
