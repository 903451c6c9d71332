"""The residual channel attention classifier and its baselines: shapes, gradients, attention, checkpoints."""
from __future__ import annotations

import pytest
import torch

from cyto_edge.errors import BadInput
from cyto_edge.train.models.rcan import ARCHS, ChannelAttention, build_classifier, load_checkpoint, save_checkpoint

SMALL = dict(widths=(8, 16, 32), groups=1, blocks=2, reduction=4)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_forward_backward(arch):
    torch.manual_seed(0)
    m = build_classifier(arch, 5, **SMALL)
    x = torch.randn(2, 3, 64, 80)   # non-square: GAP head takes any size
    y = m(x)
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    torch.nn.functional.cross_entropy(y, torch.tensor([1, 3])).backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    assert sum(float(p.grad.abs().sum()) for p in m.parameters()) > 0
    feats = m.features(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 20), (8, 10), (4, 5)]   # strides 4, 8, 16


def test_channel_attention_weights_and_rescaling():
    torch.manual_seed(0)
    ca = ChannelAttention(16, reduction=4)
    x = torch.randn(3, 16, 5, 5)
    y = ca(x)
    s = ca.last_weights
    assert s.shape == (3, 16) and (s > 0).all() and (s < 1).all()
    assert torch.allclose(y, x * s[:, :, None, None])


def test_rcan_has_attention_and_plain_has_none():
    x = torch.randn(1, 3, 32, 32)
    rcan, plain = build_classifier("rcan", 2, **SMALL), build_classifier("plain", 2, **SMALL)
    rcan(x)
    plain(x)
    assert len(rcan.attention_weights()) == 3 * SMALL["groups"] * SMALL["blocks"]
    assert plain.attention_weights() == []


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = build_classifier("rcan", 3, **SMALL).eval()
    p = save_checkpoint(tmp_path / "c.pt", m, arch="rcan", arch_kwargs=SMALL, classes=["a", "b", "c"],
                        mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), input_size=(64, 64), um_per_px=1.0)
    ckpt = torch.load(p, weights_only=False)
    assert ckpt["classes"] == ["a", "b", "c"] and ckpt["input"]["size"] == [64, 64]
    m2 = load_checkpoint(ckpt)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m(x), m2(x))
    ckpt["state_dict"].pop("head.3.weight")
    with pytest.raises(BadInput, match="not a loadable classifier"):
        load_checkpoint(ckpt, "c.pt")


def test_unknown_arch_is_bad_input():
    with pytest.raises(BadInput, match="choose one of"):
        build_classifier("densenet", 2)
