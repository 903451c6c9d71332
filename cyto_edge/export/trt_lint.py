"""Will TensorRT 10 parse this ONNX file? A static check run on the workstation by `export --target jetson`.

    problems = lint_onnx("b/model.onnx")          # [] when the graph is fine
    check_onnx("b/model.onnx")                    # raises CheckFailed naming the nodes

Checks, each naming the offending nodes:
- operators: every node's op in SUPPORTED_OPS (default ONNX domain only; no custom domains, which would
  need plugins on the device);
- opset: within OPSET_RANGE;
- INT64 weights: an INT64 initializer or Constant feeding anything but a shape-like input (Reshape's
  shape, Slice's starts, ...); TensorRT's compute layers (Conv, Gemm, MatMul, ...) do not take INT64;
- Q/DQ: zero points must be 0 and quantized types int8 (TensorRT quantization is symmetric; uint8 is
  only an I/O type for it);
- shapes: only the batch dimension (axis 0) of inputs and outputs may be dynamic (the build's
  optimization profile covers the batch only).

SUPPORTED_OPS is the "Supported = Y" column of onnx-tensorrt's docs/operators.md (the ONNX parser's
support matrix, TensorRT 10 series, read from the 10.15 table), minus operators introduced after
opset 20 (Attention, RMSNormalization, RotaryEmbedding, TensorScatter). OPSET_RANGE is that of
TensorRT 10.0-10.3 ("supports operators in the inclusive range of opset 9 to opset 20"); JetPack 6
ships TensorRT 10.3, so a graph within these limits parses on every JetPack 6 device.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cyto_edge.errors import CheckFailed

OPSET_RANGE = (9, 20)
SOURCE = "onnx-tensorrt docs/operators.md (TensorRT 10.x support matrix); opsets of TensorRT 10.0-10.3"

SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# (op, input index) pairs that take shape-like integer tensors; None = every input of the op
SHAPE_INPUTS = {
    "Reshape": {1}, "Slice": {1, 2, 3, 4}, "Unsqueeze": {1}, "Squeeze": {1}, "Expand": {1}, "Tile": {1},
    "Pad": {1, 3}, "Resize": {3}, "ConstantOfShape": {0}, "TopK": {1}, "Split": {1}, "Range": None,
    "Gather": {1}, "GatherElements": {1}, "GatherND": {1}, "ScatterND": {1}, "ScatterElements": {1},
    "OneHot": {1}, "CumSum": {1}, "ReduceSum": {1}, "ReduceMean": {1}, "ReduceMax": {1}, "ReduceMin": {1},
    "ReduceProd": {1}, "ReduceL1": {1}, "ReduceL2": {1}, "ReduceLogSum": {1}, "ReduceLogSumExp": {1},
    "ReduceSumSquare": {1}, "Shape": None, "Cast": {0}, "Equal": None, "Concat": None,
}


@dataclass
class Problem:
    kind: str      # operator | opset | int64 | qdq | shape
    where: str     # node (or tensor) name
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.where}: {self.detail}"


def _node_name(n) -> str:
    return n.name or f"{n.op_type}->{n.output[0] if n.output else '?'}"


def _int64_tensors(g) -> dict[str, str]:
    """name -> origin of every INT64 initializer or Constant output in the graph."""
    from onnx import TensorProto

    out = {i.name: "initializer" for i in g.initializer if i.data_type == TensorProto.INT64}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.INT64:
                    out[n.output[0]] = f"Constant {_node_name(n)}"
    return out


def _check_ops(m) -> list[Problem]:
    probs = []
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx") and not OPSET_RANGE[0] <= o.version <= OPSET_RANGE[1]:
            probs.append(Problem("opset", "model", f"opset {o.version} is outside TensorRT's {OPSET_RANGE[0]}-"
                                 f"{OPSET_RANGE[1]}; export with --opset {OPSET_RANGE[1]} or lower"))
    for n in m.graph.node:
        if n.domain not in ("", "ai.onnx"):
            probs.append(Problem("operator", _node_name(n), f"{n.domain}::{n.op_type} is a custom-domain op "
                                 "(needs a TensorRT plugin)"))
        elif n.op_type not in SUPPORTED_OPS:
            probs.append(Problem("operator", _node_name(n), f"{n.op_type} is not supported by TensorRT's ONNX parser"))
    return probs


def _check_int64(g) -> list[Problem]:
    probs = []
    i64 = _int64_tensors(g)
    for n in g.node:
        allowed = SHAPE_INPUTS.get(n.op_type, set())
        for k, name in enumerate(n.input):
            if name in i64 and allowed is not None and k not in allowed:
                probs.append(Problem("int64", _node_name(n), f"INT64 {i64[name]} {name!r} feeds input {k} of "
                                     f"{n.op_type}; TensorRT computes in float/int32: cast the weight"))
    return probs


def _check_qdq(g) -> list[Problem]:
    import numpy as np
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in g.initializer}
    probs = []
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        zp = inits[n.input[2]]
        if zp.data_type != TensorProto.INT8:
            probs.append(Problem("qdq", _node_name(n), f"quantized type {TensorProto.DataType.Name(zp.data_type)}; "
                                 "TensorRT needs int8 (export INT8 with symmetric int8 activations)"))
        elif np.any(numpy_helper.to_array(zp) != 0):
            probs.append(Problem("qdq", _node_name(n), "zero point is not 0; TensorRT quantization is symmetric"))
    return probs


def _check_shapes(g) -> list[Problem]:
    probs = []
    for kind, vals in (("input", g.input), ("output", g.output)):
        inits = {i.name for i in g.initializer}
        for v in vals:
            if v.name in inits:
                continue
            dims = v.type.tensor_type.shape.dim
            for k, d in enumerate(dims):
                if k > 0 and not (d.HasField("dim_value") and d.dim_value > 0):
                    probs.append(Problem("shape", v.name, f"{kind} axis {k} is dynamic ({d.dim_param or '?'}); "
                                         "only the batch axis may be"))
    return probs


def lint_onnx(path: str | Path) -> list[Problem]:
    """Every reason TensorRT 10 (JetPack 6) would refuse `path`; [] when there is none."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return _check_ops(m) + _check_int64(m.graph) + _check_qdq(m.graph) + _check_shapes(m.graph)


def check_onnx(path: str | Path, max_listed: int = 8) -> None:
    """Raise CheckFailed with the problems found by lint_onnx (the first `max_listed`, then a count)."""
    probs = lint_onnx(path)
    if probs:
        shown = "; ".join(str(p) for p in probs[:max_listed])
        more = f"; and {len(probs) - max_listed} more" if len(probs) > max_listed else ""
        raise CheckFailed(f"{path}: TensorRT would refuse this graph: {shown}{more}")
