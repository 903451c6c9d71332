"""Inference engines behind one interface, chosen by name from a registry (one module per backend).

Contract: `engine.infer(x)` takes a normalized float32 NCHW batch (any batch size; the model input
size of the bundle) and returns the raw head outputs `(loc (N, P, 4), logits (N, P, C+1))` as float32
numpy arrays, followed by `mil (N, P, C+1)` when the manifest declares one (`output.all_names()`; a MIL
detector, re-scored in tiling.detect_frame). Nothing else: decoding and NMS live in runtime/decode.py.
Engines are context managers.

    from cyto_edge.runtime.engines import load_engine
    with load_engine(bundle, "openvino", precision="int8", threads=2) as eng:
        loc, logits = eng.infer(batch)
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from cyto_edge.registry import Registry


@runtime_checkable
class Engine(Protocol):
    name: str
    precision: str

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, ...]: ...

    def close(self) -> None: ...


class EngineBase:
    """Shared plumbing: context manager, shape check of the input."""

    name = "base"
    precision = "fp32"

    def __init__(self, bundle, precision: str | None = None, device: str | None = None, threads: int | None = None,
                 **options):
        self.bundle = bundle
        self.input_size = tuple(bundle.manifest.input.size)
        self.options = options

    def check_input(self, x: np.ndarray) -> np.ndarray:
        H, W = self.input_size
        if x.ndim != 4 or x.shape[1:] != (3, H, W):
            from cyto_edge.errors import BadInput

            raise BadInput(f"{self.name}: input must be (N, 3, {H}, {W}) float32, got {tuple(x.shape)}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


ENGINES: Registry = Registry("engine", {
    "onnxruntime": "cyto_edge.runtime.engines.onnxruntime:OnnxRuntimeEngine",
    "openvino": "cyto_edge.runtime.engines.openvino:OpenVinoEngine",
    "tensorrt": "cyto_edge.runtime.engines.tensorrt:TensorRTEngine",
})


def load_engine(bundle, backend: str = "onnxruntime", **options) -> Engine:
    """An engine for an opened Bundle; options: precision, device, threads, and backend-specific ones."""
    return ENGINES.get(backend)(bundle, **options)
