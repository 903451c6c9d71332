"""TensorRT: the ONNX lint (runs anywhere), a clean error without TensorRT, and the build/run paths on a Jetson."""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from cyto_edge.cli import main
from cyto_edge.errors import CheckFailed, MissingExtra
from cyto_edge.export.trt_lint import OPSET_RANGE, SUPPORTED_OPS, check_onnx, lint_onnx
from cyto_edge.runtime.bundle import Bundle, BundleError
from cyto_edge.runtime.engines import load_engine

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def bad_graph(path):
    """A graph TensorRT refuses four ways: an unsupported op, an INT64 weight in arithmetic, a dynamic
    non-batch axis, an asymmetric (uint8, zero point 3) Q/DQ pair; and opset 22."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64, name="to_int"),
        helper.make_node("Mul", ["xi", "w64"], ["scaled"], name="mul_int64_weight"),
        helper.make_node("Unique", ["scaled"], ["uniq"], name="unique_op"),
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q_asym"),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq_asym"),
        helper.make_node("Reshape", ["y", "shape"], ["out"], name="reshape_ok"),
    ]
    inits = [numpy_helper.from_array(np.arange(8, dtype=np.int64).reshape(1, 8), "w64"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(3, np.uint8), "zp"),
             numpy_helper.from_array(np.array([-1, 8], np.int64), "shape")]     # INT64 shape: allowed
    g = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "k"])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 8]),
                           helper.make_tensor_value_info("uniq", TensorProto.INT64, ["u"])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 22)]), str(path))
    return path


def test_lint_accepts_our_exported_graphs(tiny_bundle, openvino_int8_bundle):
    assert lint_onnx(tiny_bundle / "model.onnx") == []
    assert lint_onnx(openvino_int8_bundle / "model.int8.onnx") == []   # symmetric int8 QDQ, float biases
    check_onnx(openvino_int8_bundle / "model.int8.onnx")


def test_lint_names_every_problem_of_a_bad_graph(tmp_path):
    probs = lint_onnx(bad_graph(tmp_path / "bad.onnx"))
    found = {(p.kind, p.where) for p in probs}
    assert ("operator", "unique_op") in found
    assert ("int64", "mul_int64_weight") in found
    assert ("qdq", "q_asym") in found and ("qdq", "dq_asym") in found
    assert ("shape", "x") in found and ("shape", "uniq") not in found     # axis 0 may be dynamic
    assert ("opset", "model") in found
    assert not any(p.where in ("reshape_ok", "to_int") for p in probs)   # shape inputs and casts are fine
    with pytest.raises(CheckFailed, match=r"TensorRT would refuse this graph: .*unique_op"):
        check_onnx(tmp_path / "bad.onnx")


def test_supported_op_list_is_the_tensorrt_10_matrix():
    assert {"Conv", "Clip", "HardSwish", "QuantizeLinear", "DequantizeLinear", "Reshape", "Concat"} <= SUPPORTED_OPS
    assert not {"Unique", "ConvInteger", "QLinearConv", "MatMulInteger", "StringNormalizer"} & SUPPORTED_OPS
    assert OPSET_RANGE == (9, 20)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_a_clean_error(tiny_bundle, capsys):
    with pytest.raises(MissingExtra, match=r"cyto-edge\[jetson\]"):
        load_engine(Bundle.open(tiny_bundle), "tensorrt")
    assert main(["build-engine", str(tiny_bundle)]) == 2
    err = capsys.readouterr().err
    assert "tensorrt is not installed: pip install 'cyto-edge[jetson]'" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ on a Jetson only
@pytest.fixture
def jetson_bundle(tmp_path, openvino_int8_bundle):
    dst = tmp_path / "jetson.cytobundle"
    shutil.copytree(openvino_int8_bundle, dst)
    return dst


@pytest.mark.jetson
@pytest.mark.parametrize("precision,tol", [("fp16", 1e-2), ("int8", 0.5)])
def test_build_and_run_plan(jetson_bundle, precision, tol):
    from cyto_edge.export.tensorrt import build_engine
    from cyto_edge.runtime.engines.tensorrt import gpu_info, plan_name

    res = build_engine(jetson_bundle, precision, workspace_mb=512, max_batch=4)
    rel = plan_name(gpu_info(0))
    assert res["status"] == "built" and res["plan"] == rel and (jetson_bundle / rel).is_file()
    b = Bundle.open(jetson_bundle)                                   # re-hashed manifest
    entry = next(f for f in b.manifest.files if f.path == rel)
    assert entry.kind == "trt-plan" and entry.precision == precision and entry.meta["tensorrt"]
    assert b.manifest.quality["files"][rel]["passed"]
    x = np.random.default_rng(1).normal(0, 0.5, (6, 3, *b.input_size)).astype(np.float32)   # > max_batch
    with load_engine(b, "tensorrt", precision=precision) as eng, load_engine(b, "onnxruntime") as ref:
        for o, r in zip(eng.infer(x), ref.infer(x)):
            assert o.shape == r.shape and np.abs(o - r).max() <= tol * np.abs(r).max()
    assert build_engine(jetson_bundle, precision)["status"] == "up to date"


@pytest.mark.jetson
def test_plan_for_another_gpu_is_rebuilt_not_fatal(jetson_bundle):
    from cyto_edge.export.tensorrt import build_engine

    (jetson_bundle / "model.other-gpu-sm99.10.0.0.plan").write_bytes(b"not a plan for this GPU")
    m = json.loads((jetson_bundle / "manifest.json").read_text())
    m["files"].append({"path": "model.other-gpu-sm99.10.0.0.plan", "sha256": "", "size": 0, "kind": "trt-plan",
                       "precision": "fp16", "role": "detector",
                       "meta": {"gpu": "other-gpu-sm99", "tensorrt": "10.0.0"}})
    (jetson_bundle / "manifest.json").write_text(json.dumps(m))
    b = Bundle.open(jetson_bundle, verify=False)
    b.save()                                                         # re-hash
    with pytest.raises(BundleError, match="build-engine"):
        load_engine(Bundle.open(jetson_bundle), "tensorrt", precision="fp16")
    assert build_engine(jetson_bundle, "fp16")["status"] == "built"
    with load_engine(Bundle.open(jetson_bundle), "tensorrt", precision="fp16") as eng:
        assert eng.infer(np.zeros((1, 3, *eng.input_size), np.float32))[0].shape[0] == 1
