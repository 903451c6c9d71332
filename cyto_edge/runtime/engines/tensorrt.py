"""TensorRT engine (Jetson, CUDA GPUs): a serialized plan from the bundle, run with the TensorRT 10 tensor API.

    with load_engine(bundle, "tensorrt", precision="fp16", device="cuda:0") as eng:
        loc, logits = eng.infer(batch)

Plans are not portable: one is built on the device by `cyto-edge build-engine` for its GPU and TensorRT
version and named `model.<gpu>.<tensorrt>.plan` (plan_name). This engine picks the plan of this GPU,
this TensorRT version and the precision asked for; when there is none it says to run build-engine
rather than fail later with TensorRT's "incompatible serialization version".

I/O: pinned (page-locked) host buffers and device buffers sized for the plan's largest batch (its
optimization profile), async copies and `execute_async_v3` on one CUDA stream (pycuda), the input shape
set per call with `set_input_shape`; larger batches run in chunks. TensorRT and pycuda are imported
when an engine is made: without them, MissingExtra("tensorrt", "jetson").
"""
from __future__ import annotations

import re

import numpy as np

from cyto_edge.errors import BadInput, MissingExtra
from cyto_edge.runtime.bundle import BundleError
from cyto_edge.runtime.engines import EngineBase

PRECISIONS = ("fp32", "fp16", "int8")
trt = cuda = None  # imported on first use (_import): a machine without TensorRT can still load this module


def _import() -> None:
    """Import TensorRT and pycuda; MissingExtra("tensorrt", "jetson") when absent."""
    global trt, cuda
    if trt is not None and cuda is not None:
        return
    try:
        import tensorrt
    except ImportError:
        raise MissingExtra("tensorrt", "jetson",
                           "on a Jetson TensorRT comes with JetPack's python3-libnvinfer") from None
    try:
        import pycuda.driver
    except ImportError:  # pragma: no cover - hardware only
        raise MissingExtra("pycuda", "jetson") from None
    trt, cuda = tensorrt, pycuda.driver


def device_index(device: str | None) -> int:
    m = re.fullmatch(r"(?:cuda:)?(\d+)", (device or "cuda:0").lower())
    if not m:
        raise BadInput(f"tensorrt: device {device!r} must be cuda:N")
    return int(m.group(1))


def gpu_info(index: int = 0) -> dict:
    """{"name", "slug", "compute_capability", "tensorrt"} of CUDA device `index`."""
    _import()
    cuda.init()
    dev = cuda.Device(index)
    major, minor = dev.compute_capability()
    slug = re.sub(r"[^a-z0-9]+", "-", dev.name().lower()).strip("-") + f"-sm{major}{minor}"
    return {"name": dev.name(), "slug": slug, "compute_capability": f"{major}.{minor}", "tensorrt": trt.__version__}


def plan_name(info: dict) -> str:
    return f"model.{info['slug']}.{info['tensorrt']}.plan"


def select_plan(bundle, info: dict, precision: str, file: str | None = None):
    plans = [f for f in bundle.manifest.files if f.kind == "trt-plan" and f.role == "detector"]
    if file is not None:
        plans = [f for f in plans if f.path == file]
    for f in plans:
        same_device = f.meta.get("gpu") == info["slug"] and f.meta.get("tensorrt") == info["tensorrt"]
        if same_device and f.precision == precision:
            return f
    have = ", ".join(f"{f.path} ({f.precision})" for f in plans) or "none"
    raise BundleError(f"{bundle.path}: no {precision} TensorRT plan for {info['name']} with TensorRT "
                      f"{info['tensorrt']} "
                      f"(plans in the bundle: {have}); build one on this device: "
                      f"cyto-edge build-engine {bundle.path} --precision {precision}")


class TensorRTEngine(EngineBase):
    name = "tensorrt"

    def __init__(self, bundle, precision: str | None = None, device: str | None = None, threads: int | None = None,
                 *, file: str | None = None, **options):
        super().__init__(bundle, precision, device, threads, **options)
        _import()
        self.precision = precision or "fp16"
        if self.precision not in PRECISIONS:
            raise BadInput(f"tensorrt: precision {self.precision!r} must be one of {', '.join(PRECISIONS)}")
        idx = device_index(device)
        info = gpu_info(idx)
        self.entry = select_plan(bundle, info, self.precision, file)
        self.ctx = cuda.Device(idx).retain_primary_context()
        self.ctx.push()
        try:
            self._load(bundle)
        finally:
            self.ctx.pop()

    def _load(self, bundle) -> None:
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if self.entry.meta.get("dla_core") is not None:
            self.runtime.DLA_core = int(self.entry.meta["dla_core"])
        self.engine = self.runtime.deserialize_cuda_engine((bundle.path / self.entry.path).read_bytes())
        if self.engine is None:
            raise BundleError(f"{bundle.path / self.entry.path}: TensorRT cannot deserialize this plan (built for "
                              f"another GPU or TensorRT version?); rebuild it: cyto-edge build-engine {bundle.path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.input_name = inputs[0]
        self.output_names = list(bundle.manifest.output.all_names())
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.stream = cuda.Stream()
        self.host, self.dev = {}, {}
        H, W = self.input_size
        shapes = {self.input_name: (self.max_batch, 3, H, W)}
        self.context.set_input_shape(self.input_name, shapes[self.input_name])
        for n in self.output_names:
            shapes[n] = (self.max_batch, *tuple(self.context.get_tensor_shape(n))[1:])
        for n, shape in shapes.items():
            self.host[n] = cuda.pagelocked_empty(shape, trt.nptype(self.engine.get_tensor_dtype(n)))
            self.dev[n] = cuda.mem_alloc(self.host[n].nbytes)
            self.context.set_tensor_address(n, int(self.dev[n]))

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        n = x.shape[0]
        inp = self.host[self.input_name]
        inp[:n] = x
        self.ctx.push()
        try:
            cuda.memcpy_htod_async(self.dev[self.input_name], inp[:n], self.stream)
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            for name in self.output_names:
                cuda.memcpy_dtoh_async(self.host[name][:n], self.dev[name], self.stream)
            self.stream.synchronize()
        finally:
            self.ctx.pop()
        return [self.host[name][:n].astype(np.float32, copy=True) for name in self.output_names]

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        x = self.check_input(x)
        parts = [self._run(x[s:s + self.max_batch]) for s in range(0, x.shape[0], self.max_batch)]
        return tuple(np.concatenate([p[k] for p in parts]) for k in range(len(self.output_names)))

    def close(self) -> None:
        if getattr(self, "ctx", None) is None:
            return
        self.ctx.push()
        try:
            for d in getattr(self, "dev", {}).values():
                d.free()
            self.dev, self.host, self.context, self.engine = {}, {}, None, None
        finally:
            self.ctx.pop()
            self.ctx = None
