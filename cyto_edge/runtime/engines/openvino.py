"""OpenVINO engine: the bundle's IR (openvino/*.xml) or its ONNX files, on CPU, GPU, NPU or AUTO.

    with load_engine(bundle, "openvino", precision="int8", device="CPU", threads=2) as eng:
        loc, logits = eng.infer(batch)             # (N, P, 4), (N, P, C+1) float32 [, mil]
        eng.runtime_precisions()                   # {"Convolution": {"i8": 12, ...}, ...}

Which file: the IR of the precision (fp32 `openvino/model.xml`, fp16 `openvino/model.fp16.xml`, int8
`openvino/model.int8.xml` converted from the QDQ model), else the ONNX file of that precision read
directly (`model.onnx`, `model.int8.onnx`); `file=` pins one manifest entry.

Inference precision: CPUs with AVX512-BF16 or AMX run f32 models in bf16 unless told otherwise, so
fp32 and int8 models are compiled with INFERENCE_PRECISION_HINT f32 (int8 layers still run in i8/u8;
the layers between them stay exact). fp16 asks for f16 where the device computes in f16 (GPU, NPU,
CPUs with FP16 in OPTIMIZATION_CAPABILITIES) and f32 elsewhere. `inference_precision=` overrides.
The batch dimension stays dynamic unless `batch=N` reshapes the model to a fixed batch.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from cyto_edge.errors import BadInput, MissingExtra
from cyto_edge.runtime.bundle import BundleError
from cyto_edge.runtime.engines import EngineBase

PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-qdq"}
HINT_NAMES = {"f32": "f32", "fp32": "f32", "f16": "f16", "fp16": "f16", "bf16": "bf16"}


def _openvino():
    """The openvino module, imported on first use; MissingExtra("openvino", "openvino") when absent."""
    try:
        import openvino
    except ImportError:
        raise MissingExtra("openvino", "openvino") from None
    return openvino


def select_file(bundle, precision: str, file: str | None = None):
    """The manifest entry this engine reads: `file` if given, else the IR, else the ONNX of `precision`."""
    m = bundle.manifest
    if file is not None:
        for f in m.files:
            if f.path == file and f.kind in ("openvino-xml", "onnx") and f.role == "detector":
                return f
        raise BundleError(f"{bundle.path}: no OpenVINO-readable detector file {file!r} in the manifest")
    want = PRECISIONS[precision]
    entry = m.file("openvino-xml", want) or m.file("onnx", want)
    if entry is None:
        have = ", ".join(f"{f.path} ({f.precision})" for f in m.files if f.role == "detector")
        raise BundleError(f"{bundle.path}: no {precision} model for OpenVINO (IR or ONNX); it has: {have}. "
                          f"Export it with `cyto-edge export CKPT --target openvino --precision {precision}`")
    return entry


def compile_config(core, device: str, precision: str, threads: int | None, hint: str | None) -> dict:
    """Properties for compile_model: threads, one stream, latency, and the inference precision."""
    cfg: dict = {"PERFORMANCE_HINT": "LATENCY"}
    dev = device.split(".")[0].split(":")[0]
    if threads and dev in ("CPU", "AUTO"):
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
        cfg["NUM_STREAMS"] = 1
    if hint is None:
        hint = "f32"
        if precision == "fp16" and dev in core.available_devices:
            caps = core.get_property(dev, "OPTIMIZATION_CAPABILITIES")
            hint = "f16" if "FP16" in caps else "f32"
    if hint not in HINT_NAMES:
        raise BadInput(f"openvino: inference_precision {hint!r} must be one of {', '.join(HINT_NAMES)}")
    if dev != "AUTO":
        cfg["INFERENCE_PRECISION_HINT"] = HINT_NAMES[hint]
    return cfg


class OpenVinoEngine(EngineBase):
    name = "openvino"

    def __init__(self, bundle, precision: str | None = None, device: str | None = None, threads: int | None = None,
                 *, file: str | None = None, batch: int | None = None, inference_precision: str | None = None,
                 **options):
        super().__init__(bundle, precision, device, threads, **options)
        self.precision = precision or "fp32"
        if self.precision not in PRECISIONS:
            raise BadInput(f"openvino: precision {self.precision!r} must be one of {', '.join(PRECISIONS)}")
        self.device = (device or "CPU").upper()
        ov = _openvino()
        core = ov.Core()
        dev = self.device.split(".")[0].split(":")[0]
        if dev != "AUTO" and dev not in {d.split(".")[0] for d in core.available_devices}:
            raise BadInput(f"openvino: device {self.device} is not available here "
                           f"(have: {', '.join(core.available_devices)})")
        self.entry = select_file(bundle, self.precision, file)
        model = core.read_model(str(bundle.path / self.entry.path))
        if batch:
            H, W = self.input_size
            model.reshape({model.inputs[0].get_any_name(): ov.PartialShape([int(batch), 3, H, W])})
        self.fixed_batch = int(batch) if batch else None
        self.config = compile_config(core, self.device, self.precision, threads, inference_precision)
        self.compiled = core.compile_model(model, self.device, self.config)
        self.request = self.compiled.create_infer_request()
        names = list(bundle.manifest.output.all_names())  # loc, logits[, mil]
        self.outputs = [self.compiled.output(n) for n in names]
        self.input = self.compiled.input(0)

    @property
    def inference_precision(self) -> str:
        try:
            t = self.compiled.get_property("INFERENCE_PRECISION_HINT")
            return t.get_type_name() if hasattr(t, "get_type_name") else str(t)   # "f32", "bf16", "f16"
        except RuntimeError:  # AUTO and some plugins do not report it
            return "unknown"

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        x = self.check_input(x)
        if self.fixed_batch and x.shape[0] != self.fixed_batch:
            raise BadInput(f"openvino: this engine was compiled for batch {self.fixed_batch}, got {x.shape[0]}")
        self.request.infer({self.input: x}, share_inputs=True)
        return tuple(self.request.get_tensor(o).data.astype(np.float32, copy=True) for o in self.outputs)

    def runtime_precisions(self) -> dict[str, dict[str, int]]:
        """Per layer type, how many runtime nodes execute in each precision (e.g. Convolution: {i8: 9})."""
        out: dict[str, Counter] = defaultdict(Counter)
        for op in self.compiled.get_runtime_model().get_ops():
            rt = op.get_rt_info()
            layer = rt["layerType"].astype(str) if "layerType" in rt else op.get_type_name()
            prec = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else "?"
            out[layer][prec] += 1
        return {k: dict(v) for k, v in sorted(out.items())}

    def close(self) -> None:
        self.request = None
        self.compiled = None
