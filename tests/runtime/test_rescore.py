"""MIL re-scoring at inference: the numpy mixture matches the torch computation, the decoder ranks by it,
tiling refuses a third output without its weight, and a MIL detector goes through ONNX Runtime with the
third output recorded in the manifest and applied identically to the torch path."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cyto_edge.runtime.decode import PostProcess, postprocess
from cyto_edge.runtime.rescore import rescore_probs, rescored_logits
from cyto_edge.runtime.tiling import detect_frame


def _mil_detector(seed: int = 0, size: int = 128):
    from cyto_edge.train.models.detector import create_model
    from cyto_edge.train.models.mil_head import MilDetector, MilHead

    torch.manual_seed(seed)
    m = create_model("tiny", num_classes=3, input_size=size, background_prior=None).eval()  # scores spread out
    head = MilHead(m.backbone.out_channels[1], 3, roi_size=3, hidden=16, reduce=8, refine_stages=2).eval()
    return MilDetector(m, head, level=1, topk=20, rescore_weight=0.4).eval()


def test_numpy_rescoring_matches_torch_and_is_a_distribution():
    det = _mil_detector()
    with torch.no_grad():
        loc, logits, mil = det(torch.randn(2, 3, 128, 128))
        expect = (1 - 0.4) * F.softmax(logits, -1) + 0.4 * mil                      # the torch computation
    q = rescore_probs(logits.numpy(), mil.numpy(), 0.4)
    np.testing.assert_allclose(q, expect.numpy(), atol=1e-6)
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(rescore_probs(logits.numpy(), mil.numpy(), 0.0), F.softmax(logits, -1).numpy(), atol=1e-6)
    np.testing.assert_allclose(rescore_probs(logits.numpy(), mil.numpy(), 1.0), mil.numpy(), atol=1e-6)
    # the decoder's softmax of the re-scored logits is q, so detection scores are re-scored probabilities
    z = rescored_logits(logits.numpy(), mil.numpy(), 0.4)
    pri = det.priors_numpy()
    d = postprocess(loc[0].numpy(), z[0], pri, det.variances, (128, 128), PostProcess(score_threshold=0.0, keep_probs=True))
    assert len(d) > 0
    np.testing.assert_allclose(d.probs, q[0][_prior_index(d.probs, q[0][:, 1:])][:, 1:], atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        rescore_probs(logits.numpy(), mil.numpy()[:, :5], 0.4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rescore_probs(logits.numpy(), mil.numpy(), 1.5)


def _prior_index(probs: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The prior each detection came from, found by its probability row."""
    return np.array([int(np.abs(table - p[None]).sum(1).argmin()) for p in probs])


def test_rescoring_changes_the_ranking_where_mil_disagrees():
    logits = np.log(np.array([[[0.2, 0.8, 0.0001], [0.3, 0.7, 0.0001]]], np.float32))   # prior 0 first
    mil = np.array([[[0.9, 0.1, 0.0], [0.05, 0.95, 0.0]]], np.float32)                  # MIL prefers prior 1
    q = rescore_probs(logits, mil, 0.5)
    assert q[0, 1, 1] > q[0, 0, 1]


def test_detect_frame_refuses_a_third_output_without_its_weight_and_applies_it_with_one():
    det = _mil_detector(1)
    pri = det.priors_numpy()
    from cyto_edge.train.evaluate import torch_infer

    infer = torch_infer(det, torch.device("cpu"))
    img = np.random.default_rng(0).integers(0, 255, (200, 180, 3), np.uint8)
    kw = dict(input_size=128, priors=pri, variances=det.variances, cfg=PostProcess(score_threshold=0.01),
              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), overlap=32)
    with pytest.raises(ValueError, match="rescore_weight"):
        detect_frame(infer, img, **kw)
    a = detect_frame(infer, img, rescore_weight=0.4, **kw)
    two = lambda x: infer(x)[:2]                                                         # noqa: E731
    b = detect_frame(two, img, **kw)
    assert len(a) and len(b)
    assert not (len(a) == len(b) and np.allclose(a.scores, b.scores))                  # re-scoring did something


@pytest.fixture(scope="module")
def mil_bundle(tmp_path_factory):
    """A checkpoint of a MIL detector (tiny, untrained) written as `cyto-edge train` writes it, and its bundle."""
    from cyto_edge.export.bundle_writer import export_fp32_bundle
    from cyto_edge.train.checkpoint import save_checkpoint
    from cyto_edge.train.config import MilCfg
    from cyto_edge.train.data.torch_data import MEAN, STD
    from cyto_edge.train.mil import MilComponent
    from cyto_edge.train.models.detector import create_model, spec_dict

    d = tmp_path_factory.mktemp("milbundle")
    torch.manual_seed(3)
    m = create_model("tiny", num_classes=3, input_size=128)
    with torch.no_grad():  # spread the untrained head's scores: no near-ties in the top-K priors between runtimes
        for p in m.head.classification_head.parameters():
            p.normal_(0, 0.3)
    comp = MilComponent(MilCfg(proposals=20, roi_size=3, hidden=16, reduce=8, refine_stages=2, rescore=0.4))

    class _DS:
        images = []
    comp.check(m, _DS(), 1.0)
    classes = ["hsil", "trichomonas", "candida"]
    state = {"model": spec_dict(m), "state_dict": m.state_dict(), "ema_state_dict": None, "classes": classes,
             "bethesda": {"hsil": "HSIL", "trichomonas": "NILM", "candida": "NILM"}, "organisms": ["trichomonas", "candida"],
             "um_per_px": 1.0, "normalization": {"mean": list(MEAN), "std": list(STD), "scale": 1 / 255.0, "color": "RGB"},
             "priors": m.priors_numpy(), "variances": list(m.variances), "tile_overlap": 32,
             "components": [comp.state_dict()], "component_meta": [comp.meta()]}
    ck = save_checkpoint(d / "mil.pt", state)
    return ck, export_fp32_bundle(ck, d / "mil.cytobundle")


def test_export_round_trip_with_the_mil_output_through_onnxruntime(mil_bundle):
    from cyto_edge.runtime.bundle import Bundle
    from cyto_edge.runtime.engines import load_engine
    from cyto_edge.train.checkpoint import load_checkpoint
    from cyto_edge.train.evaluate import torch_infer
    from cyto_edge.train.mil import inference_model_from_checkpoint

    ck_path, bdir = mil_bundle
    b = Bundle.open(bdir)
    assert b.manifest.output.mil is not None and b.manifest.output.all_names() == ["loc", "logits", "mil"]
    assert b.rescore_weight() == pytest.approx(0.4) and b.manifest.output.mil.topk == 20
    model = inference_model_from_checkpoint(load_checkpoint(ck_path))
    x = np.random.default_rng(1).normal(size=(3, 3, 128, 128)).astype(np.float32)
    with load_engine(b, "onnxruntime", threads=1) as eng:
        outs = eng.infer(x)
        ref = torch_infer(model, torch.device("cpu"))(x)
        assert len(outs) == 3
        for o, r in zip(outs, ref):
            assert o.shape == r.shape
            np.testing.assert_allclose(o, r, atol=2e-4, rtol=1e-3)
        # the device path and the training-side path give the same detections on a frame
        img = np.random.default_rng(2).integers(0, 255, (150, 170, 3), np.uint8)
        kw = dict(input_size=128, priors=b.priors(), variances=b.manifest.output.variances,
                  cfg=PostProcess(score_threshold=0.01), mean=b.manifest.input.mean, std=b.manifest.input.std,
                  overlap=32, rescore_weight=b.rescore_weight())
        d_dev = detect_frame(eng.infer, img, **kw)
        d_torch = detect_frame(torch_infer(model, torch.device("cpu")), img, **kw)
    assert len(d_dev) == len(d_torch) > 0
    key = lambda d: np.lexsort((*np.round(d.boxes, 1).T, d.labels, np.round(d.scores, 4)))   # noqa: E731 ties
    a, t = d_dev.select(key(d_dev)), d_torch.select(key(d_torch))
    np.testing.assert_allclose(a.scores, t.scores, atol=1e-4)
    np.testing.assert_allclose(a.boxes, t.boxes, atol=1e-2)
    assert (a.labels == t.labels).all()
