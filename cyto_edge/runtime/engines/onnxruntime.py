"""ONNX Runtime engine: CPU everywhere; CUDA / TensorRT execution providers where installed."""
from __future__ import annotations

import numpy as np

from cyto_edge.errors import BadInput, MissingExtra
from cyto_edge.runtime.engines import EngineBase

try:
    import onnxruntime as ort
except ImportError as e:  # pragma: no cover - the runtime extra installs it
    raise MissingExtra("onnxruntime", "runtime") from e

PRECISION_FILES = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-qdq"}
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


class OnnxRuntimeEngine(EngineBase):
    name = "onnxruntime"

    def __init__(self, bundle, precision: str | None = None, device: str | None = None, threads: int | None = None,
                 **options):
        super().__init__(bundle, precision, device, threads, **options)
        self.precision = precision or "fp32"
        if self.precision not in PRECISION_FILES:
            raise BadInput(f"onnxruntime: precision {self.precision!r} must be one of {', '.join(PRECISION_FILES)}")
        path = bundle.model_file("onnx", PRECISION_FILES[self.precision])
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        dev = (device or "cpu").lower().split(":")[0]
        if dev not in PROVIDERS:
            raise BadInput(f"onnxruntime: device {device!r} must be one of {', '.join(PROVIDERS)}")
        available = set(ort.get_available_providers())
        wanted = [p for p in PROVIDERS[dev] if p in available]
        if PROVIDERS[dev][0] not in available:
            raise BadInput(f"onnxruntime: {PROVIDERS[dev][0]} is not available here (have: {', '.join(sorted(available))})")
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=wanted)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = list(bundle.manifest.output.names)
        self.providers = self.session.get_providers()

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        loc, logits = self.session.run(self.output_names, {self.input_name: self.check_input(x)})
        return loc.astype(np.float32, copy=False), logits.astype(np.float32, copy=False)
