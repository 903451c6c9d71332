"""ONNX Runtime engine: CPU everywhere; CUDA / TensorRT execution providers where installed."""
from __future__ import annotations

import numpy as np

from cyto_edge.errors import BadInput, MissingExtra
from cyto_edge.runtime.bundle import BundleError
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
                 *, file: str | None = None, spin_wait: bool | None = None, **options):
        """`spin_wait`: whether the intra-op threads busy-wait for the next run (ONNX Runtime's default, None).
        Fastest back-to-back inference on an idle machine; where the same cores also serve a live preview,
        grading helpers and a web server, spinning takes their CPU (the daemon turns it off)."""
        super().__init__(bundle, precision, device, threads, **options)
        self.precision = precision or "fp32"
        if self.precision not in PRECISION_FILES:
            raise BadInput(f"onnxruntime: precision {self.precision!r} must be one of {', '.join(PRECISION_FILES)}")
        path = self._model_path(bundle, file)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        if spin_wait is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin_wait else "0")
        self.spin_wait = spin_wait
        dev = (device or "cpu").lower().split(":")[0]
        if dev not in PROVIDERS:
            raise BadInput(f"onnxruntime: device {device!r} must be one of {', '.join(PROVIDERS)}")
        available = set(ort.get_available_providers())
        wanted = [p for p in PROVIDERS[dev] if p in available]
        if PROVIDERS[dev][0] not in available:
            raise BadInput(f"onnxruntime: {PROVIDERS[dev][0]} is not available here (have: {', '.join(sorted(available))})")
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=wanted)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = bundle.manifest.output.all_names()   # loc, logits[, mil]
        self.providers = self.session.get_providers()

    def _model_path(self, bundle, file: str | None):
        """The ONNX file of the precision, or the manifest entry `file` (pinned by the export gate)."""
        if file is None:
            return bundle.model_file("onnx", PRECISION_FILES[self.precision])
        for f in bundle.manifest.files:
            if f.path == file and f.kind == "onnx" and f.role == "detector":
                return bundle.path / f.path
        raise BundleError(f"{bundle.path}: no ONNX detector file {file!r} in the manifest")

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        outs = self.session.run(self.output_names, {self.input_name: self.check_input(x)})
        return tuple(o.astype(np.float32, copy=False) for o in outs)
