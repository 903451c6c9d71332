"""Quantization-aware fine-tuning: the simulated int8 is the QDQ file's, and `--qat-epochs` exports through the gate."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cyto_edge.export.qat import (WMAX, FakeQuantConv, fold_batchnorms, input_overrides,  # noqa: E402
                                  unwrap_convs, wrap_convs)
from cyto_edge.runtime.bundle import Bundle  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from cyto_edge.train.checkpoint import load_checkpoint, model_from_checkpoint

    return model_from_checkpoint(load_checkpoint(tiny_checkpoint))


def test_folding_batchnorms_keeps_the_outputs(model):
    import copy

    x = torch.randn(2, 3, 320, 320)
    folded = copy.deepcopy(model)
    assert fold_batchnorms(folded) > 10
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        for a, b in zip(model(x), folded(x)):
            assert torch.allclose(a, b, atol=1e-4 * float(b.abs().max()))


def test_fake_quant_weights_are_the_qdq_files_weights(model, tmp_path, tiny_bundle, synth_small):
    """FakeQuantConv's int8 weights equal the DequantizeLinear weights ONNX Runtime writes into the QDQ file."""
    import copy

    import onnx
    from onnx import numpy_helper

    from cyto_edge.export.calibration import calibration_tiles
    from cyto_edge.export.onnx import export_onnx
    from cyto_edge.export.quantize import export_int8
    from cyto_edge.train.data import load_detection

    folded = copy.deepcopy(model)
    fold_batchnorms(folded)
    src = export_onnx(folded, tmp_path / "folded.onnx")
    tiles = calibration_tiles(load_detection(synth_small, "train"), Bundle.open(tiny_bundle).manifest, 4)
    q = onnx.load(str(export_int8(src, tmp_path / "q.onnx", tiles)))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    convs = wrap_convs(folded)
    checked = 0
    for n in q.graph.node:
        if n.op_type != "Conv":
            continue
        dq = producer[n.input[1]]
        w_q, scale = inits[dq.input[0]].astype(np.float32), inits[dq.input[1]]
        ort_w = w_q * scale.reshape(-1, *[1] * (w_q.ndim - 1))
        name = dq.input[0].removeprefix("model.").removesuffix("_quantized").removesuffix(".weight")
        fq: FakeQuantConv = convs[name]
        w = fq.conv.weight.detach()
        s = (w.abs().amax(dim=(1, 2, 3)) / WMAX).clamp(min=1e-8)
        ours = torch.fake_quantize_per_channel_affine(w, s, torch.zeros_like(s, dtype=torch.int32), 0, -WMAX, WMAX)
        np.testing.assert_allclose(ours.numpy(), ort_w, rtol=1e-5, atol=1e-7)
        checked += 1
    unwrap_convs(folded)
    assert checked == len(convs) > 10


def test_export_with_qat(tiny_checkpoint, tmp_path):
    import onnx

    from cyto_edge.export.pipeline import ExportOptions, export_bundle

    out = tmp_path / "qat.cytobundle"
    s = export_bundle(tiny_checkpoint, ExportOptions(target="cpu", precision="int8", out=out, calib_images=8,
                                                     val_images=2, qat_epochs=2, qat_steps=3), show_progress=False)
    assert s["failed"] == {}
    m = Bundle.open(out).manifest
    meta = m.file("onnx", "int8-qdq").meta
    conv_inputs = {n.input[0] for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "Conv"}
    assert meta["qat"]["steps"] == 6 and meta["qat"]["pinned_input_ranges"] == len(conv_inputs)
    assert meta["qdq"]["fraction"] >= 0.95
    q = m.quality["files"]["model.int8.onnx"]
    assert q["passed"] and q["raw_max_rel_diff"]["logits"] < 0.5


def test_input_overrides_match_convs_by_weight_name(tiny_bundle):
    import onnx

    g = onnx.load(str(tiny_bundle / "model.onnx")).graph
    convs = [n for n in g.node if n.op_type == "Conv"]
    names = {n.input[1].removeprefix("model.").removesuffix(".weight"): 1.5 for n in convs}
    ov = input_overrides(tiny_bundle / "model.onnx", names)
    assert set(ov) == {n.input[0] for n in convs} and all(v == (-1.5, 1.5) for v in ov.values())
