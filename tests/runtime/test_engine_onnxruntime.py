"""The ONNX Runtime engine returns the torch model's raw outputs from an fp32 bundle."""
import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.runtime.bundle import Bundle
from cyto_edge.runtime.engines import ENGINES, load_engine


def test_onnxruntime_matches_torch(tiny_bundle, tiny_checkpoint):
    torch = pytest.importorskip("torch")
    from cyto_edge.train.checkpoint import load_checkpoint, model_from_checkpoint

    b = Bundle.open(tiny_bundle)
    x = np.random.default_rng(0).normal(size=(3, 3, *b.input_size)).astype(np.float32)
    with load_engine(b, "onnxruntime", threads=1) as eng:
        loc, logits = eng.infer(x)
        loc1, _ = eng.infer(x[:1])                   # dynamic batch
    with torch.no_grad():
        tl, tg = model_from_checkpoint(load_checkpoint(tiny_checkpoint))(torch.from_numpy(x))
    assert loc.shape == tuple(tl.shape) and logits.shape == tuple(tg.shape)
    assert np.abs(loc - tl.numpy()).max() <= 1e-4 * np.abs(tl.numpy()).max()
    assert np.abs(logits - tg.numpy()).max() <= 1e-4 * np.abs(tg.numpy()).max()
    np.testing.assert_allclose(loc1, loc[:1], atol=1e-5)


def test_engine_rejects_wrong_input_and_unknown_backend(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    with load_engine(b, "onnxruntime") as eng:
        with pytest.raises(BadInput, match="input must be"):
            eng.infer(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(BadInput, match="unknown engine"):
        load_engine(b, "coreml")
    assert {"onnxruntime", "openvino", "tensorrt"} <= set(ENGINES.names())


def test_spin_wait_reaches_the_session_and_device_profiles_turn_it_off(tiny_bundle, tmp_path):
    import yaml

    from cyto_edge.runtime.pipeline import build_pipeline
    from cyto_edge.runtime.profile import load_profile

    b = Bundle.open(tiny_bundle)
    key = "session.intra_op.allow_spinning"
    for spin, want in ((False, "0"), (True, "1")):
        with load_engine(b, "onnxruntime", threads=2, spin_wait=spin) as eng:
            assert eng.session.get_session_options().get_session_config_entry(key) == want
    with load_engine(b, "onnxruntime", threads=2) as eng:        # not set: ONNX Runtime's default
        with pytest.raises(RuntimeError, match="does not have configuration"):
            eng.session.get_session_options().get_session_config_entry(key)
    prof = {"name": "t", "camera": {"kind": "synth", "um_per_px": 1.0},
            "engine": {"backend": "onnxruntime", "threads": 2}, "bundle": str(tiny_bundle),
            "storage": {"root": str(tmp_path / "s")}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(prof))
    pipe = build_pipeline(b, profile=load_profile(tmp_path / "p.yaml"))
    try:
        assert pipe.engine.spin_wait is False
        assert pipe.engine.session.get_session_options().get_session_config_entry(key) == "0"
    finally:
        pipe.close()
