"""Every registered detector builds, runs forward and backward at 128 px, and keeps the tensor contract."""
import numpy as np
import pytest
import torch

from cyto_edge.runtime.priors import PriorSpec, make_priors
from cyto_edge.train.models import MODELS, create_model, model_info
from cyto_edge.train.models.detector import rebuild, spec_dict


@pytest.mark.parametrize("name", MODELS.names())
def test_builder_forward_backward_at_128(name):
    torch.manual_seed(0)
    m = create_model(name, num_classes=4, input_size=128)
    x = torch.randn(2, 3, 128, 128)
    loc, logits, feats = m(x, return_features=True)
    P = m.priors.shape[0]
    assert loc.shape == (2, P, 4) and logits.shape == (2, P, 5)
    assert len(feats) == len(m.prior_spec.feature_sizes)
    assert [tuple(f.shape[-2:]) for f in feats] == [tuple(s) for s in m.prior_spec.feature_sizes]
    (loc.square().mean() + logits.logsumexp(-1).mean()).backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name", ["tiny", "ssdlite320_mobilenetv3", "ssd320_resnet18"])
def test_rebuild_from_spec_gives_same_outputs(name):
    torch.manual_seed(1)
    m = create_model(name, num_classes=3, input_size=160).eval()
    m2 = rebuild(spec_dict(m)).eval()
    m2.load_state_dict(m.state_dict())
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        a, b = m(x), m2(x)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    np.testing.assert_array_equal(m.priors_numpy(), m2.priors_numpy())


def test_model_info_counts_params_and_flops():
    m = create_model("tiny", num_classes=11)
    info = model_info(m)
    assert info["params"] == sum(p.numel() for p in m.parameters())
    assert 0.01 < info["gflops"] < 1.0
    big = model_info(create_model("ssd320_resnet18", num_classes=11))
    assert big["gflops"] > 8 * info["gflops"]


def test_priors_follow_eq4_corrected():
    """s_k linear in k from s_min to s_max; extra 1:1 box sqrt(s_k s_k+1); h = s_k / sqrt(a)."""
    spec = PriorSpec(input_size=(300, 300), feature_sizes=[(4, 4), (2, 2), (1, 1)], aspect_ratios=[[2.0]] * 3,
                     s_min=0.2, s_max=0.9)
    pri = make_priors(spec)
    assert spec.level_scales() == pytest.approx([0.2, 0.55, 0.9, 1.0])
    first = pri[:4]                                  # the four anchors of cell (0, 0) on the 4x4 map
    assert first[0, :2] == pytest.approx([0.125, 0.125])
    assert first[0, 2:] == pytest.approx([0.2, 0.2])
    assert first[1, 2:] == pytest.approx([np.sqrt(0.2 * 0.55)] * 2)
    assert first[2, 2:] == pytest.approx([0.2 * np.sqrt(2), 0.2 / np.sqrt(2)])
    assert first[3, 2:] == pytest.approx([0.2 / np.sqrt(2), 0.2 * np.sqrt(2)])
    assert len(pri) == (16 + 4 + 1) * 4


@pytest.mark.parametrize("name,p", [("tiny", 0.99), ("ssd320_resnet18", 0.95)])
def test_head_starts_out_predicting_background(name, p):
    """The classification bias makes every prior start at P(background) ~ p, whatever the head type
    (SSDLite's depthwise branches and SSD's plain convolutions) and whatever the input."""
    torch.manual_seed(0)
    m = create_model(name, num_classes=11, input_size=128, background_prior=p).eval()
    with torch.no_grad():
        _, logits = m(torch.randn(2, 3, 128, 128))
    bg = logits.softmax(-1)[..., 0]
    assert abs(float(bg.median()) - p) < 0.05, float(bg.median())
    plain = create_model(name, num_classes=11, input_size=128, background_prior=None).eval()
    with torch.no_grad():
        _, logits = plain(torch.randn(2, 3, 128, 128))
    assert float(logits.softmax(-1)[..., 0].median()) < 0.5     # torchvision's own init: near 1/12
