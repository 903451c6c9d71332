"""The OpenVINO engine: ONNX or IR from the bundle, f32 precision hint, dynamic or fixed batch, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.runtime.bundle import Bundle, BundleError
from cyto_edge.runtime.engines import load_engine

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def tiles(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    return np.random.default_rng(0).normal(0, 1, (3, 3, *b.input_size)).astype(np.float32)


def test_reads_the_onnx_when_there_is_no_ir(tiny_bundle, tiles):
    b = Bundle.open(tiny_bundle)
    with load_engine(b, "openvino", threads=1) as ov, load_engine(b, "onnxruntime", threads=1) as ort:
        assert ov.entry.path == "model.onnx" and ov.inference_precision == "f32"
        assert ov.config["INFERENCE_NUM_THREADS"] == 1
        for a, r in zip(ov.infer(tiles), ort.infer(tiles)):
            assert a.shape == r.shape and np.abs(a - r).max() <= 1e-4 * np.abs(r).max()
        assert ov.infer(tiles[:1])[0].shape[0] == 1                   # dynamic batch


def test_the_cpu_would_otherwise_run_bf16(tiny_bundle, tiles):
    """The hint matters on CPUs with bf16: asking for bf16 changes the numbers, f32 does not."""
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16: its default is already f32")
    b = Bundle.open(tiny_bundle)
    with load_engine(b, "openvino", threads=1) as f32, \
            load_engine(b, "openvino", threads=1, inference_precision="bf16") as bf16:
        assert bf16.inference_precision == "bf16"
        r, lo = f32.infer(tiles)[1], bf16.infer(tiles)[1]
    assert np.abs(lo - r).max() > 1e-3 * np.abs(r).max()


def test_fixed_batch_and_runtime_precisions(tiny_bundle, tiles):
    with load_engine(Bundle.open(tiny_bundle), "openvino", threads=1, batch=3) as eng:
        assert eng.infer(tiles)[0].shape[0] == 3
        with pytest.raises(BadInput, match="compiled for batch 3"):
            eng.infer(tiles[:1])
        prec = eng.runtime_precisions()
        assert prec["Convolution"] and set(prec["Convolution"]) == {"f32"}


def test_errors_name_the_problem(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    with pytest.raises(BundleError, match="no int8 model for OpenVINO"):
        load_engine(b, "openvino", precision="int8")
    with pytest.raises(BadInput, match="precision 'int4'"):
        load_engine(b, "openvino", precision="int4")
    with pytest.raises(BadInput, match="device NPU is not available|device NPU"):
        import openvino as ov

        if "NPU" in ov.Core().available_devices:
            pytest.skip("this machine has an NPU")
        load_engine(b, "openvino", device="NPU")
    with pytest.raises(BundleError, match="no OpenVINO-readable detector file"):
        load_engine(b, "openvino", file="priors.npy")
    with load_engine(b, "openvino") as eng:
        with pytest.raises(BadInput, match="input must be"):
            eng.infer(np.zeros((1, 3, 64, 64), np.float32))
