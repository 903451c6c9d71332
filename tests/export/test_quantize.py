"""INT8: calibration tiles as the device cuts them, one symmetric QDQ file per calibration method."""
from __future__ import annotations

import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.export.calibration import TileReader, calibration_tiles, image_tiles, read_rgb, scale_factor
from cyto_edge.export.quantize import (METHODS, entropy_ranges, export_int8, output_convolutions, qdq_coverage,
                                       unquantize_outputs, zero_points_nonzero)
from cyto_edge.export.trt_lint import lint_onnx
from cyto_edge.runtime.bundle import Bundle


@pytest.fixture(scope="module")
def train_ds(synth_small):
    from cyto_edge.train.data import load_detection

    return load_detection(synth_small, "train")


@pytest.fixture(scope="module")
def tiles(train_ds, tiny_bundle):
    return calibration_tiles(train_ds, Bundle.open(tiny_bundle).manifest, 8, seed=0)


def test_calibration_tiles_are_what_the_device_sees(train_ds, tiny_bundle):
    m = Bundle.open(tiny_bundle).manifest
    one = train_ds.subset([0])
    t = calibration_tiles(one, m, 3, seed=5)
    assert t.shape == (3, 3, *m.input.size) and t.dtype == np.float32
    device = image_tiles(read_rgb(one.images[0].file), m, scale_factor(one.um_per_px, m))   # runtime/tiling's cut
    for tile in t:
        assert np.min(np.abs(device - tile).reshape(len(device), -1).max(1)) == 0.0
    again = calibration_tiles(one, m, 3, seed=5)
    np.testing.assert_array_equal(t, again)                          # seeded
    with pytest.raises(BadInput, match="--calib-images"):
        calibration_tiles(one, m, 0)


def test_tile_reader_batches_and_rewinds(tiles):
    r = TileReader(tiles, "images", batch=3)
    sizes = []
    while (b := r.get_next()) is not None:
        sizes.append(len(b["images"]))
    assert sizes == [3, 3, 2] and len(r) == 3
    r.rewind()
    assert r.get_next()["images"].shape[0] == 3


@pytest.mark.parametrize("method", METHODS)
def test_int8_qdq_per_method(tiny_bundle, tiles, tmp_path, method):
    import onnxruntime as ort

    out = export_int8(tiny_bundle / "model.onnx", tmp_path / f"{method}.onnx", tiles, method)
    cov = qdq_coverage(out)
    assert cov["fraction"] >= 0.95 and cov["inputs_quantized_fraction"] >= 0.95, cov
    assert zero_points_nonzero(out) == [] and lint_onnx(out) == []   # symmetric: TensorRT takes it
    x = tiles[:4]
    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})

    ref, q = run(tiny_bundle / "model.onnx"), run(out)
    for a, r in zip(q, ref):
        assert np.corrcoef(a.ravel(), r.ravel())[0, 1] > 0.98
        assert not np.array_equal(a, r)                              # it really is quantized


def test_int8_file_keeps_the_float_graph_s_operators(tiles, tmp_path):
    """Only Q/DQ pairs are added: HardSwish stays one operator (ONNX Runtime's optimizer would rewrite it as
    HardSigmoid x Mul, which OpenVINO cannot fuse into its int8 convolutions, and which ran 1.5x slower)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = tiles.shape[1]
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, c, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w2")
    g = helper.make_graph(
        [helper.make_node("Conv", ["images", "w1"], ["a"], pads=[1, 1, 1, 1]),
         helper.make_node("HardSwish", ["a"], ["b"]),
         helper.make_node("Conv", ["b", "w2"], ["out"])],
        "hswish", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, *tiles.shape[1:]])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [w1, w2])
    fp32 = tmp_path / "hswish.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    out = export_int8(fp32, tmp_path / "hswish.int8.onnx", tiles)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    assert ops == ["Conv", "HardSwish", "Conv"], ops
    assert qdq_coverage(out)["fraction"] == 1.0
    last = onnx.load(str(out)).graph.node[-1]          # the graph output comes straight from the last Conv
    assert last.op_type == "Conv" and last.output[0] == "out"


def test_unknown_method_is_bad_input(tiny_bundle, tiles, tmp_path):
    with pytest.raises(BadInput, match="--calib-method"):
        export_int8(tiny_bundle / "model.onnx", tmp_path / "x.onnx", tiles, "kl")


def test_the_head_s_output_convolutions_can_stay_float(tiny_bundle, tiles, tmp_path):
    fp32 = tiny_bundle / "model.onnx"
    head = output_convolutions(fp32)
    assert len(head) == 8                                # tiny: 4 levels x (box regression, class logits)
    out = export_int8(fp32, tmp_path / "headfloat.onnx", tiles, "minmax", keep_float=head)
    cov = qdq_coverage(out)
    assert sorted(cov["not_quantized"]) == sorted(head) and cov["quantized"] == cov["weights"] - 8
    assert zero_points_nonzero(out) == [] and lint_onnx(out) == []


def _consumers(path):
    import onnx

    g = onnx.load(str(path)).graph
    out: dict = {}
    for n in g.node:
        for i in n.input:
            out.setdefault(i, []).append(n.op_type)
    return g, out


def test_the_head_s_outputs_stay_float_while_its_convolutions_are_int8(tiny_bundle, tiles, tmp_path):
    """The default file: no Q/DQ on the raw outputs (box regressions, logits), every convolution's weights and
    inputs still quantized; its outputs are closer to fp32 than those of the file with quantized outputs."""
    import onnxruntime as ort

    fp32 = tiny_bundle / "model.onnx"
    head = set(output_convolutions(fp32))
    flo = export_int8(fp32, tmp_path / "float_out.onnx", tiles, "minmax")
    qua = export_int8(fp32, tmp_path / "quant_out.onnx", tiles, "minmax", float_outputs=False)
    for path, quantized_outputs in ((flo, False), (qua, True)):
        g, cons = _consumers(path)
        convs = [n for n in g.node if n.name in head]
        assert len(convs) == len(head) == 8
        assert all(("QuantizeLinear" in cons.get(n.output[0], [])) == quantized_outputs for n in convs)
        cov = qdq_coverage(path)
        assert cov["fraction"] == 1.0 and cov["inputs_quantized_fraction"] == 1.0, cov
        assert zero_points_nonzero(path) == [] and lint_onnx(path) == []
    assert unquantize_outputs(flo) == []                            # nothing left to change
    x = tiles

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})

    ref, a, b = run(fp32), run(flo), run(qua)
    err = [sum(float(np.abs(o - r).mean()) for o, r in zip(out, ref)) for out in (a, b)]
    assert err[0] < err[1], err


def test_entropy_calibration_narrows_the_ranges_minmax_takes(tiny_bundle, tiles, tmp_path):
    """The fine-histogram KL threshold clips tails: never wider than the tensor's |max|, narrower for some
    tensors; and the file's activation scales differ from minmax's (they were identical through
    quantize_static's 128-bin default)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp_path / "pre.onnx"
    quant_pre_process(str(tiny_bundle / "model.onnx"), str(pre), skip_symbolic_shape=True, skip_optimization=True)
    ent = entropy_ranges(pre, tiles)
    assert "images" in ent and len(ent) > 8
    sess_out = {}
    import onnxruntime as ort

    # the true |max| of every calibrated tensor, from the same tiles
    m = onnx.load(str(pre))
    names = list(ent)
    del m.graph.output[:]
    m.graph.output.extend([onnx.helper.make_empty_tensor_value_info(n) for n in names])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for n, v in zip(names, sess.run(None, {"images": tiles})):
        sess_out[n] = float(np.abs(v).max())
    assert all(abs(lo) <= sess_out[n] * 1.0001 + 1e-6 and hi <= sess_out[n] * 1.0001 + 1e-6
               for n, (lo, hi) in ent.items())
    assert sum(hi < 0.9 * sess_out[n] for n, (lo, hi) in ent.items()) >= 1
    assert all(lo == -hi for lo, hi in ent.values())                    # symmetric, as the int8 activations

    def scales(path):
        g = onnx.load(str(path)).graph
        init = {i.name: i for i in g.initializer}
        return sorted(float(numpy_helper.to_array(init[n.input[1]]).max()) for n in g.node
                      if n.op_type == "QuantizeLinear" and n.input[1] in init)

    e = export_int8(tiny_bundle / "model.onnx", tmp_path / "entropy.onnx", tiles, "entropy")
    mm = export_int8(tiny_bundle / "model.onnx", tmp_path / "minmax.onnx", tiles, "minmax")
    assert scales(e) != scales(mm)
