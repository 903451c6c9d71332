"""OpenVINO IR from the bundle's ONNX files: FP32, FP16 (weights compressed to f16) and INT8 (from the QDQ file).

    xml = export_openvino("b/model.int8.onnx", "b/openvino/model.int8.xml", "int8-qdq")

The IR keeps the dynamic batch of the ONNX graph. INT8 comes from the one QDQ file (export/quantize.py):
OpenVINO turns its Q/DQ pairs into FakeQuantize and its low-precision transformations run the
convolutions in u8/i8 (checked at export through OpenVinoEngine.runtime_precisions). The engine compiles
FP32 with INFERENCE_PRECISION_HINT f32 (runtime/engines/openvino.py), so a CPU with bf16 does not
silently run the fp32 model in bf16.
"""
from __future__ import annotations

from pathlib import Path

from cyto_edge.errors import MissingExtra

IR_NAMES = {"fp32": "openvino/model.xml", "fp16": "openvino/model.fp16.xml", "int8-qdq": "openvino/model.int8.xml"}


def export_openvino(onnx_path: str | Path, out_xml: str | Path, precision: str) -> Path:
    """Convert `onnx_path` to IR at `out_xml` (+ .bin beside it); fp16 compresses the weights to f16."""
    try:
        import openvino as ov
    except ImportError as e:
        raise MissingExtra("openvino", "openvino") from e
    if precision not in IR_NAMES:
        raise ValueError(f"OpenVINO IR precision {precision!r} must be one of {', '.join(IR_NAMES)}")
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    model.set_rt_info(precision, ["cyto_edge", "precision"])
    ov.save_model(model, str(out_xml), compress_to_fp16=(precision == "fp16"))
    return out_xml
