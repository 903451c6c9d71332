"""Local distillation: masks, attention, identity case, gradient path, refusal of a mismatched teacher."""
import pytest
import torch

from cyto_edge.errors import BadInput
from cyto_edge.train.losses.distill import LocalDistillLoss, attention, foreground_masks, match_levels
from cyto_edge.train.models import create_model


def test_masks_match_hand_computed_case():
    # 4x4 map, cell centres at 0.125, 0.375, 0.625, 0.875; a box over [0.1, 0.5] x [0.3, 0.9]
    boxes = torch.tensor([[[0.1, 0.3, 0.5, 0.9], [0.9, 0.0, 0.95, 0.05]]])   # second: smaller than a cell
    m, s = foreground_masks(boxes, torch.tensor([[True, True]]), (4, 4))
    expect = torch.zeros(4, 4)
    expect[1:4, 0:2] = 1          # rows with centres .375 .625 .875, columns .125 .375
    expect[0, 3] = 1              # the tiny box marks the cell holding its centre
    torch.testing.assert_close(m[0], expect)
    assert s[0, 1, 0] == pytest.approx(1 / 6) and s[0, 0, 3] == pytest.approx(1.0)
    assert s[0, 0, 0] == pytest.approx(1 / 9)          # background: 1 / N_bg, 16 - 7 cells
    assert float(s[0][m[0] == 0].sum()) == pytest.approx(1.0)
    m2, s2 = foreground_masks(boxes, torch.tensor([[False, False]]), (4, 4))
    assert float(m2.sum()) == 0 and float(s2.sum()) == pytest.approx(1.0)


def test_attention_shapes_and_normalisation():
    f = torch.randn(2, 8, 5, 6)
    a_s, a_c = attention(f, 0.5)
    assert a_s.shape == (2, 5, 6) and a_c.shape == (2, 8)
    torch.testing.assert_close(a_s.sum((1, 2)), torch.full((2,), 30.0))
    torch.testing.assert_close(a_c.sum(1), torch.full((2,), 8.0))


def _boxes():
    return torch.tensor([[[0.2, 0.2, 0.4, 0.45]], [[0.5, 0.6, 0.7, 0.8]]]), torch.ones(2, 1, dtype=torch.bool)


def test_identity_student_gives_zero_feature_and_attention_loss():
    torch.manual_seed(0)
    m = create_model("tiny", num_classes=3, input_size=128).eval()
    x = torch.randn(2, 3, 128, 128)
    feats = m.features(x)
    ch = m.backbone.out_channels
    loss = LocalDistillLoss(ch, ch, [(i, i) for i in range(len(ch))])
    for conv, c in zip(loss.adapt, ch):
        with torch.no_grad():
            conv.weight.copy_(torch.eye(c)[:, :, None, None])
            conv.bias.zero_()
    out = loss(feats, [f.detach() for f in feats], *_boxes())
    assert float(out["ld_fea"]) < 1e-10 and float(out["ld_att"]) < 1e-10


def test_ld_gradient_reaches_student_backbone_and_not_teacher():
    torch.manual_seed(1)
    student = create_model("tiny", num_classes=3, input_size=128, width=8)
    teacher = create_model("tiny", num_classes=3, input_size=128, width=16).eval()
    x = torch.randn(2, 3, 128, 128)
    pairs = match_levels([tuple(s) for s in teacher.prior_spec.feature_sizes], [tuple(s) for s in student.prior_spec.feature_sizes])
    assert pairs == [(i, i) for i in range(4)]
    loss = LocalDistillLoss(student.backbone.out_channels, teacher.backbone.out_channels, pairs)
    with torch.no_grad():
        tf = teacher.features(x)
    out = loss(student.features(x), tf, *_boxes())
    (out["ld_fea"] + out["ld_att"]).backward()
    first = next(student.backbone.parameters())
    assert first.grad is not None and float(first.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in student.head.parameters())   # L_dis touches features only
    assert float(out["_ld_fg"]) > 0 and float(out["_ld_bg"]) > 0


def test_levels_of_different_size_are_resized():
    pairs = match_levels([(40, 40), (20, 20), (10, 10)], [(20, 20), (5, 5)])
    assert pairs == [(0, 1), (1, 2)]
    loss = LocalDistillLoss([4, 4], [6, 6, 6], pairs)
    s = [torch.randn(1, 4, 20, 20), torch.randn(1, 4, 5, 5)]
    t = [torch.randn(1, 6, 40, 40), torch.randn(1, 6, 20, 20), torch.randn(1, 6, 10, 10)]
    out = loss(s, t, torch.tensor([[[0.1, 0.1, 0.3, 0.3]]]), torch.tensor([[True]]))
    assert torch.isfinite(out["ld_fea"]) and float(out["ld_fea"]) > 0


def test_distill_refuses_mismatched_teacher_before_training(toy_coco, tmp_path):
    from cyto_edge.train.config import load_config
    from cyto_edge.train.distill import LocalDistillation
    from cyto_edge.train.loop import Trainer

    fast = [f"data.root={toy_coco}", f"out_dir={tmp_path}", "workers=0", "tensorboard=false", "threads=1",
            "schedule.epochs=1", "schedule.steps_per_epoch=2", "optim.batch_size=4", "data.val_fraction=0",
            "model.input_size=128"]
    teacher = Trainer(load_config("tiny", fast + ["name=t"])).run()["last"]
    cfg = load_config("tiny", fast + ["name=s", "model.input_size=160", f"distill.teacher={teacher}"])
    with pytest.raises(BadInput, match="input 128"):
        Trainer(cfg, components=[LocalDistillation(cfg.distill)]).setup()
    cfg = load_config("tiny", fast + ["name=s2", f"distill.teacher={teacher}", "model.um_per_px=0.5"])
    with pytest.raises(BadInput, match="scale"):
        Trainer(cfg, components=[LocalDistillation(cfg.distill)]).setup()
    # the same teacher and student settings train, and the LD terms are logged
    cfg = load_config("tiny", fast + ["name=s3", f"distill.teacher={teacher}", "model.kwargs.width=8"])
    res = Trainer(cfg, components=[LocalDistillation(cfg.distill)]).run()
    header = (tmp_path / "s3" / "metrics.csv").read_text().splitlines()[0]
    assert "train_ld_fea" in header and "train_ld_att" in header and "train_multibox" in header
    assert res["steps"] == 2
