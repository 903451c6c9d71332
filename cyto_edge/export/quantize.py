"""INT8: static post-training quantization of the fp32 ONNX to ONE QDQ ONNX file.

    path = export_int8("b/model.onnx", "b/model.int8.onnx", tiles, method="entropy")
    qdq_coverage(path)     # {"weights": 37, "quantized": 37, "fraction": 1.0, ...}

The one file serves ONNX Runtime, OpenVINO and TensorRT, so it is written in the form all three take:
QuantizeLinear/DequantizeLinear pairs (QuantFormat.QDQ) on the weighted operations (Conv, Gemm: their
weights and inputs, TensorRT's recommended Q/DQ placement; everything else stays float, and so do the
detector's raw outputs: `unquantize_outputs`), weights int8
symmetric per output channel in a 7-bit range ([-64, 64], `reduce_range`), activations int8 symmetric per
tensor (zero point 0), biases float. The 7-bit weights are for x86 CPUs without VNNI (AVX2 only, e.g. many
AMD EPYC and older Intel Core): their u8 x s8 kernels (vpmaddubsw) add pairs of products in 16 bits, which
saturate with full-range weights. On such a CPU the tiny test model's int8 outputs (ONNX Runtime and
OpenVINO alike) differed from fp32 by 0.17 x max|fp32| with 8-bit weights and 0.09 with 7-bit ones (ONNX
Runtime's quantization docs give the same advice). VNNI CPUs, ARM and TensorRT lose half a bit of weight
precision for it, so that one file is right on every device.
Quantizing every operator instead (ONNX Runtime's default) adds ~30 standalone FakeQuantize layers to
OpenVINO's graph of the CPU student and made it slower, at the same accuracy. TensorRT accepts only symmetric int8 Q/DQ
(onnx-tensorrt docs/operators.md: QuantizeLinear "`y_zero_point` must be 0", DequantizeLinear
"`x_zero_point` must be zero"; TensorRT "Working with Quantized Types": symmetric quantization).
ONNX Runtime on x86 converts s8 activations to u8 internally for its VNNI kernels; OpenVINO's
low-precision transformations run the convolutions in u8/i8 (see OpenVinoEngine.runtime_precisions).

Calibration methods (onnxruntime.quantization.CalibrationMethod): minmax (range of every tensor over
the calibration tiles), entropy (KL-divergence threshold of the histogram, as TensorRT's calibrator),
percentile (99.999th percentile of |x|). Calibration tiles come from export/calibration.py.
Entropy is computed here (`entropy_ranges`, `kl_threshold`): through quantize_static, ONNX Runtime's
entropy calibrator keeps num_bins = num_quantized_bins = 128, which leaves a single candidate threshold,
the whole range (its get_entropy_threshold), so "entropy" gave exactly minmax's ranges. Here the
histogram has 2048 bins over [-max|x|, max|x|], every threshold from 255/2048 of the range up is tried
against 255 quantized levels (int8's over [-t, t]), as TensorRT's entropy calibrator does, and the
ranges reach quantize_static as TensorQuantOverrides.
`overrides` pins activation ranges by tensor name (quantization-aware fine-tuning, export/qat.py).
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np

from cyto_edge.errors import BadInput
from cyto_edge.export.calibration import TileReader
from cyto_edge.export.onnx import INPUT_NAME

METHODS = ("minmax", "entropy", "percentile")
WEIGHT_OPS = ("Conv", "Gemm")          # quantized operator types (and those counted by qdq_coverage)
SETTINGS = {"format": "QDQ", "weights": "int8 symmetric per-channel, 7-bit range",
            "activations": "int8 symmetric per-tensor", "bias": "float",
            "outputs": "float (no Q/DQ on the outputs of the head's last convolutions)"}


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}
    if name not in table:
        raise BadInput(f"--calib-method {name!r} must be one of {', '.join(METHODS)}")
    return table[name]


def export_int8(fp32_onnx: str | Path, out: str | Path, tiles: np.ndarray, method: str = "minmax",
                overrides: dict[str, tuple[float, float]] | None = None, batch: int = 8,
                activations: str = "int8", reduce_range: bool = True, keep_float: list[str] | None = None,
                float_outputs: bool = True) -> Path:
    """Quantize `fp32_onnx` with calibration `tiles` (N, 3, H, W) float32 into the QDQ file `out`.

    activations "int8" (symmetric, the bundle's one file) or "uint8" (asymmetric: ONNX Runtime on x86 can then
    drop the ReLU/Clip between Q/DQ pairs, but TensorRT refuses it; benchmarks compare the two).
    reduce_range: 7-bit weights (see the module docstring); False gives full-range 8-bit weights.
    keep_float: names of nodes left in float (e.g. output_convolutions(fp32_onnx), the detection head's last).
    float_outputs: no Q/DQ pair on the outputs of the head's last convolutions (`unquantize_outputs`); their
    weights and inputs stay int8. False quantizes those outputs too (ONNX Runtime's default placement)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    calib = _method(method)
    if activations not in ("int8", "uint8"):
        raise ValueError(f"activations {activations!r} must be int8 or uint8")
    # biases stay float (TensorRT's DequantizeLinear takes int8, not int32; ORT and OpenVINO fuse them as fast)
    extra: dict = {"ActivationSymmetric": activations == "int8", "WeightSymmetric": True, "QuantizeBias": False}
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    with tempfile.TemporaryDirectory(prefix="cyto-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # the calibrators print progress to stdout: keep the command's --json output clean
        with contextlib.redirect_stdout(io.StringIO()):
            # skip_optimization: ONNX Runtime's graph optimizer rewrites HardSwish as HardSigmoid x Mul (the
            # MobileNetV3 student has 20), which OpenVINO then cannot fuse into the int8 convolutions: the
            # student's OpenVINO int8 file ran 7.3 ms per tile against 4.8 ms without the rewrite (ORT 20.4 vs
            # 13.6 ms; 1 thread, batch 1). The fp32 graph is already folded (BatchNorm, constants) at export.
            quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=True, skip_optimization=True)
            ranges = {}
            if method == "entropy":      # ranges from our own histogram run; quantize_static only applies them
                ranges = entropy_ranges(pre, tiles, batch, symmetric=activations == "int8")
                calib = _method("minmax")
            ranges.update(overrides or {})
            if ranges:
                extra["TensorQuantOverrides"] = {name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                                 for name, (lo, hi) in ranges.items()}
            quantize_static(str(pre), str(out), TileReader(tiles, INPUT_NAME, batch), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(WEIGHT_OPS), per_channel=True, reduce_range=reduce_range,
                            activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=calib, extra_options=extra,
                            nodes_to_exclude=list(keep_float or []),
                            calibration_providers=["CPUExecutionProvider"])
    if float_outputs:
        unquantize_outputs(out)
    return out


def entropy_ranges(onnx_path: str | Path, tiles: np.ndarray, batch: int = 8, symmetric: bool = True,
                   num_bins: int = 2048, num_quantized_bins: int = 255) -> dict[str, tuple[float, float]]:
    """Activation ranges (-t, t) by minimal KL divergence (TensorRT's entropy calibration) for the
    inputs and outputs of the Conv/Gemm nodes of `onnx_path`. ONNX Runtime's entropy calibrator collects
    the histograms (`num_bins` over [-max|x|, max|x|]); the threshold search is `kl_threshold`, as its own
    (a Python loop over every bin of every candidate) took minutes per model. symmetric=False (uint8
    activations): [max(-t, min x), min(t, max x)]."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    with tempfile.TemporaryDirectory(prefix="cyto-entropy-") as tmp:
        cal = create_calibrator(Path(onnx_path), list(WEIGHT_OPS),
                                augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                calibrate_method=CalibrationMethod.Entropy, providers=["CPUExecutionProvider"],
                                extra_options={"symmetric": True, "num_bins": num_bins,
                                               "num_quantized_bins": num_quantized_bins})
        cal.collect_data(TileReader(tiles, INPUT_NAME, batch))
        hists = cal.collector.histogram_dict          # {tensor: (hist, edges, min, max, threshold)}
        del cal
    out = {}
    for name, (hist, edges, lo, hi, *_rest) in hists.items():
        t = kl_threshold(np.asarray(hist), np.asarray(edges), num_quantized_bins)
        out[name] = (-t, t) if symmetric else (max(-t, float(lo)), min(t, float(hi)))
    return out


def kl_threshold(hist: np.ndarray, edges: np.ndarray, num_quantized_bins: int = 255) -> float:
    """The clipping threshold t of a histogram symmetric about zero (`edges` from -T to T) whose int8
    version (`num_quantized_bins` levels over [-t, t]) is closest in KL divergence to the clipped
    distribution: the calibration of Migacz, "8-bit inference with TensorRT" (GTC 2017), in the form
    of MXNet's _get_optimal_threshold (outliers folded into the end bins, the quantized distribution
    spread over the non-empty bins, both smoothed by 1e-4), each candidate in numpy."""
    hist = hist.astype(np.float64)
    n, nq = hist.size, int(num_quantized_bins)
    zero, half = n // 2, nq // 2
    if half >= zero or hist.sum() == 0:
        return float(edges[-1])
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    best, best_t = np.inf, float(edges[-1])
    for i in range(half, zero + 1):
        lo, hi = zero - i, min(zero + i + 1, n)
        sliced = hist[lo:hi]
        p = sliced.copy()
        p[0] += cum[lo]
        p[-1] += cum[-1] - cum[hi]
        nonzero = p != 0
        m = sliced.size // nq
        body = nq * m
        merged = sliced[:body].reshape(nq, m).sum(1)
        merged[-1] += sliced[body:].sum()
        norm = nonzero[:body].reshape(nq, m).sum(1).astype(np.float64)
        norm[-1] += nonzero[body:].sum()
        per_bin = np.divide(merged, norm, out=np.zeros(nq), where=norm > 0)
        q = np.concatenate([np.repeat(per_bin, m), np.full(sliced.size - body, per_bin[-1])])
        q[~nonzero] = 0.0
        kl = _kl_divergence(p, q)
        if kl < best:
            best, best_t = kl, float(edges[hi])
    return best_t


def _kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """KL(p || q) of two histograms after moving `eps` of mass into their empty bins (inf if q is empty)."""
    def smooth(h: np.ndarray) -> np.ndarray | None:
        zeros = h == 0
        n_zero, n_nonzero = int(zeros.sum()), int(h.size - zeros.sum())
        if n_nonzero == 0:
            return None
        out = h + eps * zeros - (eps * n_zero / n_nonzero) * ~zeros
        return out if np.all(out > 0) else None

    ps, qs = smooth(p), smooth(q)
    if ps is None or qs is None:
        return float("inf")
    ps, qs = ps / ps.sum(), qs / qs.sum()
    return float(np.sum(ps * np.log(ps / qs)))


def _consumers(g) -> dict[str, list]:
    """{tensor name: the nodes of graph `g` that read it}."""
    out: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def output_convolutions(path: str | Path) -> list[str]:
    """Names of the Conv nodes whose output reaches no other Conv: a detector's last convolutions, which
    produce the box regressions and class logits."""
    import onnx

    return _output_convolutions(onnx.load(str(path), load_external_data=False).graph)


def _output_convolutions(g) -> list[str]:
    consumers = _consumers(g)

    def reaches_conv(tensor: str, seen: set) -> bool:
        for c in consumers.get(tensor, []):
            if id(c) in seen:
                continue
            seen.add(id(c))
            if c.op_type == "Conv" or any(reaches_conv(o, seen) for o in c.output):
                return True
        return False

    return [n.name for n in g.node if n.op_type == "Conv" and not any(reaches_conv(o, set()) for o in n.output)]


def unquantize_outputs(path: str | Path, convs: list[str] | None = None) -> list[str]:
    """Drop the QuantizeLinear/DequantizeLinear pair on the OUTPUT of `convs` (default: the output
    convolutions, the head's box regressions and class logits) of the QDQ file `path`, in place; their
    weights and inputs stay quantized. Returns the names of the convolutions changed.

    ONNX Runtime's QDQ quantizer puts a Q/DQ pair on every quantized Conv's output. On the head's last
    convolutions that rounds the detector's raw outputs to one per-tensor int8 step: on the CPU teacher
    (minmax over 64 tiles) the ten output tensors got steps of 0.09 to 2.1 (class logits spanning +-270 at
    the finest level), which tied and reordered the scores each class's ranking is made of; mAP@0.5 fell
    by 10-14 points, and by 0.05 (ONNX Runtime) and 1.1 (OpenVINO) without those pairs (README Status).
    Without the pair the convolution still runs in int8 with a float output: OpenVINO's low-precision
    transformations need dequantized inputs only, TensorRT recommends Q/DQ on inputs, not on a network's
    outputs. ONNX Runtime runs these few convolutions in float on the dequantized int8 weights and inputs
    (its QLinearConv fusion needs the output pair)."""
    import onnx

    path = Path(path)
    m = onnx.load(str(path))
    g = m.graph
    names = set(_output_convolutions(g) if convs is None else convs)
    consumers = _consumers(g)
    graph_outputs = {o.name for o in g.output}
    drop, changed = set(), []
    for conv in [n for n in g.node if n.op_type in WEIGHT_OPS and n.name in names]:
        out = conv.output[0]
        qs = consumers.get(out, [])
        if not qs or any(q.op_type != "QuantizeLinear" for q in qs) or out in graph_outputs:
            continue
        dqs = [d for q in qs for d in consumers.get(q.output[0], [])]
        if any(d.op_type != "DequantizeLinear" for d in dqs) or any(q.output[0] in graph_outputs for q in qs):
            continue
        for d in dqs:
            if d.output[0] in graph_outputs:           # the pair ended the graph: the conv takes the name
                conv.output[0] = out = d.output[0]
            for c in consumers.get(d.output[0], []):
                c.input[:] = [out if i == d.output[0] else i for i in c.input]
        drop.update(id(n) for n in qs + dqs)
        changed.append(conv.name)
    keep = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return changed


def qdq_coverage(path: str | Path) -> dict:
    """How much of the model runs in int8: Conv/Gemm whose weight and input come through DequantizeLinear."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    nodes = [n for n in g.node if n.op_type in WEIGHT_OPS]

    def dq(name: str) -> bool:
        p = producer.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    w = [n for n in nodes if len(n.input) > 1 and dq(n.input[1])]
    a = [n for n in nodes if dq(n.input[0])]
    n = max(1, len(nodes))
    return {"weights": len(nodes), "quantized": len(w), "fraction": round(len(w) / n, 4),
            "inputs_quantized_fraction": round(len(a) / n, 4),
            "not_quantized": [x.name for x in nodes if x not in w][:20]}


def zero_points_nonzero(path: str | Path) -> list[str]:
    """Q/DQ nodes whose zero point is not 0 (TensorRT refuses them); [] for a symmetric file."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    bad = []
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            if np.any(numpy_helper.to_array(inits[n.input[2]]) != 0):
                bad.append(n.name or n.output[0])
    return bad
