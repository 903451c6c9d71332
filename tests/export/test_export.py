"""`cyto-edge export`: files per target, round trips through the runtime engines, the acceptance gate."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cyto_edge.cli import main
from cyto_edge.errors import BadInput, CheckFailed
from cyto_edge.runtime.bundle import Bundle, write_manifest
from cyto_edge.runtime.engines import load_engine

# per precision: max |engine - torch| / max |torch| on real tiles, and the least correlation with torch
ROUND_TRIP = {"fp32": (1e-4, 0.99999), "fp16": (1e-2, 0.999), "int8": (0.25, 0.98)}


@pytest.fixture(scope="module")
def torch_outputs(tiny_checkpoint, synth_small, openvino_int8_bundle):
    """Real model-input tiles of the test split, and the torch model's raw outputs on them."""
    torch = pytest.importorskip("torch")
    from cyto_edge.export.calibration import calibration_tiles
    from cyto_edge.train.checkpoint import load_checkpoint, model_from_checkpoint
    from cyto_edge.train.data import load_detection

    b = Bundle.open(openvino_int8_bundle)
    x = calibration_tiles(load_detection(synth_small, "test"), b.manifest, 6, seed=1)
    with torch.no_grad():
        ref = [t.numpy() for t in model_from_checkpoint(load_checkpoint(tiny_checkpoint))(torch.from_numpy(x))]
    return x, ref


def check_round_trip(bundle_dir, backend, precision, file, torch_outputs):
    x, ref = torch_outputs
    with load_engine(Bundle.open(bundle_dir), backend, precision=precision, threads=2, file=file) as eng:
        out = eng.infer(x)
        one = eng.infer(x[:1])                       # dynamic batch: the same tile alone
    rel_tol, min_corr = ROUND_TRIP[precision]
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == np.float32
        err = np.abs(o - r)           # int8: judged as the export gate judges it, on the 99th percentile
        assert (np.percentile(err, 99) if precision == "int8" else err.max()) <= rel_tol * np.abs(r).max()
        assert np.corrcoef(o.ravel(), r.ravel())[0, 1] >= min_corr
    np.testing.assert_allclose(one[1], out[1][:1], rtol=0, atol=1e-3 * np.abs(out[1]).max())


@pytest.mark.parametrize("backend,precision,file", [
    ("onnxruntime", "fp32", "model.onnx"), ("onnxruntime", "int8", "model.int8.onnx"),
    ("openvino", "fp32", "openvino/model.xml"), ("openvino", "int8", "openvino/model.int8.xml"),
    ("openvino", "int8", "model.int8.onnx")])
def test_round_trip_int8_bundle(openvino_int8_bundle, torch_outputs, backend, precision, file):
    check_round_trip(openvino_int8_bundle, backend, precision, file, torch_outputs)


@pytest.mark.parametrize("precision,file", [("fp32", "openvino/model.xml"), ("fp16", "openvino/model.fp16.xml")])
def test_round_trip_openvino_fp16_bundle(openvino_fp16_bundle, torch_outputs, precision, file):
    check_round_trip(openvino_fp16_bundle, "openvino", precision, file, torch_outputs)


def test_int8_bundle_files_and_manifest(openvino_int8_bundle):
    m = Bundle.open(openvino_int8_bundle).manifest
    kinds = {(f.path, f.kind, f.precision) for f in m.files}
    assert {("model.onnx", "onnx", "fp32"), ("model.int8.onnx", "onnx", "int8-qdq"),
            ("openvino/model.xml", "openvino-xml", "fp32"), ("openvino/model.int8.xml", "openvino-xml", "int8-qdq"),
            ("openvino/model.int8.bin", "openvino-bin", "int8-qdq")} <= kinds
    int8 = m.file("onnx", "int8-qdq")
    assert int8.meta["opset"] == m.file("onnx", "fp32").meta["opset"] == 18
    assert int8.meta["qdq"]["fraction"] >= 0.95 and int8.meta["calib_tiles"] == 16
    assert m.provenance["export"]["target"] == "openvino" and m.provenance["checkpoint_sha256"]
    q = m.quality
    assert q["gate"]["passed"] and q["gate"]["val_images"] == 3
    assert set(q["files"]) == {"model.onnx", "model.int8.onnx", "openvino/model.xml", "openvino/model.int8.xml"}
    assert q["files"]["model.onnx"]["raw_max_rel_diff"]["logits"] <= 1e-4
    assert q["files"]["openvino/model.xml"]["inference_precision"] == "f32"   # not the CPU's bf16 default
    # OpenVINO's runtime model: the convolutions of the QDQ model execute in 8 bits
    for path in ("model.int8.onnx", "openvino/model.int8.xml"):
        ov = q["files"][path]["openvino_runtime"]
        assert ov["int8_fraction"] >= 0.95, ov


def test_fp16_ir_is_half_the_size(openvino_fp16_bundle):
    m = Bundle.open(openvino_fp16_bundle).manifest
    fp32 = next(f for f in m.files if f.path == "openvino/model.bin").size
    fp16 = next(f for f in m.files if f.path == "openvino/model.fp16.bin").size
    assert 0.4 < fp16 / fp32 < 0.6
    assert m.quality["files"]["openvino/model.fp16.xml"]["passed"]


def test_gate_catches_one_perturbed_weight(tiny_bundle, tiny_checkpoint, copy_bundle):
    """Perturb one weight of one convolution of model.onnx (manifest re-hashed): the gate must fail it."""
    import onnx
    from onnx import numpy_helper

    from cyto_edge.export.pipeline import ExportOptions, reverify

    opts = ExportOptions(target="cpu", out=tiny_bundle, val_images=3, threads=2)
    good = copy_bundle(tiny_bundle, "good.cytobundle")
    assert reverify(good, tiny_checkpoint, opts)["failed"] == {}
    bad = copy_bundle(tiny_bundle, "bad.cytobundle")
    model = onnx.load(str(bad / "model.onnx"))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 0.5 * np.abs(w).max()
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(bad / "model.onnx"))
    b = Bundle.open(bad, verify=False)
    write_manifest(bad, b.manifest)                   # a consistent bundle: only the gate can tell
    with pytest.raises(CheckFailed, match=r"model\.onnx: fails the export gate: .*max \|diff\|"):
        reverify(bad, tiny_checkpoint, opts)
    q = json.loads((bad / "manifest.json").read_text())["quality"]
    assert q["gate"]["passed"] is False and q["files"]["model.onnx"]["raw_max_rel_diff"]["logits"] > 1e-4
    assert main(["bundle", "verify", str(bad)]) == 1


def test_cli_jetson_fp16_json(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "jetson.cytobundle"
    rc = main(["export", str(tiny_checkpoint), "--target", "jetson", "--out", str(out), "--val-images", "2", "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["target"] == "jetson" and s["precision"] == "fp16" and s["failed"] == {}
    assert set(s["files"]) == {"priors.npy", "model.onnx"}        # the plan is built on the device
    assert main(["bundle", "verify", str(out)]) == 0


def test_cli_refuses_bad_usage(tiny_checkpoint, tmp_path, capsys):
    assert main(["export", str(tiny_checkpoint), "--target", "cpu", "--precision", "fp16",
                 "--out", str(tmp_path / "x.cytobundle")]) == 2
    assert "not available for --target cpu" in capsys.readouterr().err
    assert main(["export", str(tiny_checkpoint), "--target", "tpu", "--out", str(tmp_path / "x.cytobundle")]) == 2
    assert main(["export", str(tiny_checkpoint), "--out", str(tmp_path / "x.zip")]) == 2
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.cytobundle")]) == 2


def test_options_resolve_precision_per_target():
    from cyto_edge.export.pipeline import ExportOptions

    assert ExportOptions("rpi", out=None).resolved_precision() == "int8"
    assert ExportOptions("jetson", out=None).resolved_precision() == "fp16"
    with pytest.raises(BadInput):
        ExportOptions("rpi", out=None, precision="fp32").resolved_precision()


def test_int8_raw_check_is_robust_to_one_outlier_but_not_to_a_broken_graph():
    """int8 is judged on the 99th percentile of |diff|: one prior moved by int8 rounding passes, an output
    wrong everywhere (a broken scale) fails; fp32 keeps the maximum, so the same outlier fails there."""
    from cyto_edge.export.verify import GateSettings, RunResult, judge

    rng = np.random.default_rng(0)
    ref = [rng.normal(0, 1, (4, 500, 4)).astype(np.float32), rng.normal(0, 3, (4, 500, 12)).astype(np.float32)]
    names = ["loc", "logits"]
    s = GateSettings(images=[], classes=["a"], factor=1.0, operating_score=0.5)

    def run(outs):
        return RunResult(raw=outs, dets=[], map50=None)

    noisy = [r + rng.normal(0, 0.02 * np.abs(r).max(), r.shape).astype(np.float32) for r in ref]
    noisy[1][0, 7, 3] += 2 * np.abs(ref[1]).max()                      # one outlier logit
    ok = judge("int8-qdq", run(ref), run(noisy), names, s)
    assert ok["passed"], ok["reason"]
    assert ok["raw_max_rel_diff"]["logits"] > 1.0 and ok["raw_p99_rel_diff"]["logits"] < 0.1
    broken = [r * 1.6 for r in ref]                                    # a mis-scaled graph
    bad = judge("int8-qdq", run(ref), run(broken), names, s)
    assert not bad["passed"] and "p99 |diff|" in bad["reason"]
    assert not judge("fp32", run(ref), run(noisy), names, s)["passed"]
