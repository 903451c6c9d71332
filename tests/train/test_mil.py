"""MIL detector (LD-WSCCD eq. 15-16 after OICR): μ is a probability, OICR seeds and weights on hand-built
cases, the inference model's third output, the training component end to end (losses logged, head saved,
pseudo-boxes on weak crops, resume), and a MIL-only model localising objects from image labels."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cyto_edge.train.losses.mil import image_loss, mil_scores, oicr_losses, oicr_targets, pseudo_boxes, refine_loss
from cyto_edge.train.models.detector import create_model
from cyto_edge.train.models.mil_head import MilDetector, MilHead, decode, field_priors
from cyto_edge.runtime.decode import decode_boxes
from cyto_edge.runtime.priors import make_priors


def test_mu_is_a_valid_probability_and_the_sum_of_region_scores():
    torch.manual_seed(0)
    for scale in (1.0, 50.0):                                  # ordinary and saturated logits
        cls, det = torch.randn(3, 7, 6) * scale, torch.randn(3, 7, 5) * scale     # cls: C+1 with background
        mask = torch.ones(3, 7, dtype=torch.bool)
        mask[1, 4:] = False                                    # a padded bag
        x, mu = mil_scores(cls, det, mask)
        assert torch.all(x >= 0) and torch.all(mu >= 0) and torch.all(mu <= 1)
        assert float(x[1, 4:].abs().sum()) == 0                # padding holds no score
        torch.testing.assert_close(mu, x.sum(1).clamp(0, 1))
        # the region softmax makes every class column sum to one over the real regions
        sd = F.softmax(det[1, :4], 0)
        torch.testing.assert_close(x[1, :4], F.softmax(cls[1, :4], -1)[:, 1:] * sd)
    # one region, one class dominating both streams: μ -> 1 for it
    x, mu = mil_scores(torch.tensor([[[0.0, 20.0, 0.0]]]), torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool))
    assert float(mu[0, 0]) == pytest.approx(1.0, abs=1e-6) and float(mu[0, 1]) < 1e-6
    # every region background: μ -> 0 for every class (a field with no labelled abnormality)
    x, mu = mil_scores(torch.tensor([[[20.0, 0.0, 0.0]] * 3]), torch.randn(1, 3, 2), torch.ones(1, 3, dtype=torch.bool))
    assert float(mu.max()) < 1e-6


def test_image_loss_is_multilabel_bce():
    mu = torch.tensor([[0.9, 0.2, 0.5]])
    y = torch.tensor([[1.0, 0.0, 1.0]])
    expect = -(math.log(0.9) + math.log(0.8) + math.log(0.5))
    assert float(image_loss(mu, y)) == pytest.approx(expect, rel=1e-5)
    assert float(image_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))) < 1e-4


def _boxes():
    # five proposals (xyxy px): 1 and 2 overlap (IoU 0.64); 0 overlaps 1 at IoU 1/3; 3 and 4 are apart
    return torch.tensor([[[0., 0., 10., 10.], [5., 0., 15., 10.], [6., 0., 16., 10.],
                          [40., 40., 60., 60.], [52., 40., 72., 60.]]])


def test_oicr_seeds_are_the_top_proposal_of_each_present_class_and_weights_their_scores():
    boxes = _boxes()
    prev = torch.tensor([[[0.10, 0.90, 0.05],      # class 1 is absent: its high score makes no seed
                          [0.60, 0.00, 0.05],      # top of class 0 -> seed (0.60)
                          [0.20, 0.00, 0.02],
                          [0.05, 0.00, 0.30],      # top of class 2 -> seed (0.30)
                          [0.01, 0.05, 0.10]]])
    y = torch.tensor([[1.0, 0.0, 1.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    labels, w = oicr_targets(prev, boxes, mask, y)
    # proposal 0: IoU 1/3 with seed 1 -> background, weighted by that seed; 1 and 2: class 0 (+1);
    # 3: the class-2 seed itself; 4: IoU 8/32 with seed 3 -> background with the class-2 seed's weight
    assert labels.tolist() == [[0, 1, 1, 3, 0]]
    torch.testing.assert_close(w, torch.tensor([[0.60, 0.60, 0.60, 0.30, 0.30]]))
    # ground-truth seeds (boxed crops) count with weight 1
    labels, w = oicr_targets(prev, boxes, mask, y, gt_boxes=torch.tensor([[[52., 40., 72., 60.]]]),
                             gt_labels=torch.tensor([[1]]), gt_valid=torch.tensor([[True]]))
    assert labels[0, 4] == 2 and float(w[0, 4]) == 1.0
    # a bag with no class present: every proposal background, weight 1
    labels, w = oicr_targets(prev, boxes, mask, torch.zeros(1, 3))
    assert labels.sum() == 0 and torch.all(w == 1)
    # padded proposals never become seeds
    mask2 = mask.clone()
    mask2[0, 1] = False
    labels, _ = oicr_targets(prev, boxes, mask2, y)
    assert labels[0, 2] == 1                                   # proposal 2 is now the class-0 seed


def test_refine_loss_is_eq16_and_stages_chain():
    torch.manual_seed(1)
    logits = torch.randn(1, 5, 4)
    labels = torch.tensor([[0, 1, 1, 3, 0]])
    w = torch.tensor([[0.6, 0.6, 0.6, 0.3, 0.3]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    logp = F.log_softmax(logits[0], -1)
    expect = -sum(float(w[0, r]) * float(logp[r, labels[0, r]]) for r in range(5)) / 5
    assert float(refine_loss(logits, labels, w, mask)) == pytest.approx(expect, rel=1e-5)
    # through oicr_losses: stage 1 is supervised by x_r, stage 2 by stage 1's foreground columns
    cls, det = torch.randn(1, 5, 4), torch.randn(1, 5, 3)
    y = torch.tensor([[1.0, 0.0, 1.0]])
    refs = [torch.randn(1, 5, 4, requires_grad=True) for _ in range(2)]
    out = oicr_losses(cls, det, refs, _boxes(), mask, y)
    x, _ = mil_scores(cls, det, mask)
    l1, w1 = oicr_targets(x, _boxes(), mask, y)
    l2, w2 = oicr_targets(F.softmax(refs[0].detach(), -1)[..., 1:], _boxes(), mask, y)
    manual = refine_loss(refs[0], l1, w1, mask) + refine_loss(refs[1], l2, w2, mask)
    assert float(out["ref"].detach()) == pytest.approx(float(manual), rel=1e-5)
    out["ref"].backward()
    assert refs[0].grad.abs().sum() > 0 and refs[1].grad.abs().sum() > 0


def test_pseudo_boxes_keep_confident_proposals_of_labelled_classes_only():
    probs = torch.zeros(1, 5, 4)
    probs[0, :, 0] = 1.0
    probs[0, 1] = torch.tensor([0.1, 0.9, 0.0, 0.0])           # class 0, confident
    probs[0, 2] = torch.tensor([0.2, 0.8, 0.0, 0.0])           # overlaps 1 at IoU 0.64: suppressed by NMS
    probs[0, 3] = torch.tensor([0.1, 0.0, 0.9, 0.0])           # class 1 is not in the image labels
    probs[0, 4] = torch.tensor([0.6, 0.0, 0.0, 0.4])           # class 2 below the threshold
    gb, gl, gv = pseudo_boxes(probs, _boxes(), torch.ones(1, 5, dtype=torch.bool), torch.tensor([[1., 0., 1.]]), 0.5)
    assert int(gv.sum()) == 1 and gl[0, 0] == 0
    torch.testing.assert_close(gb[0, 0], _boxes()[0, 1])


def test_torch_decode_matches_the_runtime_decoder_and_field_priors_match_make_priors():
    m = create_model("tiny", num_classes=3, input_size=128)
    pri = m.priors_numpy()
    loc = np.random.default_rng(0).normal(size=pri.shape).astype(np.float32)
    ref = decode_boxes(loc, pri, m.variances, (128, 128))
    got = decode(torch.from_numpy(loc), torch.from_numpy(pri), m.variances, (128, 128)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    # priors laid over a field the size of the input are the model's priors, in pixels
    fp = field_priors(m.prior_spec, m.prior_spec.feature_sizes, (128, 128))
    np.testing.assert_allclose(np.clip(fp / 128, 0, 1), make_priors(m.prior_spec), atol=1e-6)


def test_mil_detector_third_output_rescores_only_the_top_k_priors():
    torch.manual_seed(2)
    m = create_model("tiny", num_classes=3, input_size=128).eval()
    head = MilHead(m.backbone.out_channels[1], 3, roi_size=3, hidden=16, reduce=8, refine_stages=2).eval()
    det = MilDetector(m, head, level=1, topk=10, rescore_weight=0.5).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        loc, logits, mil = det(x)
    assert mil.shape == logits.shape
    p = F.softmax(logits, -1)
    changed = (mil - p).abs().amax(-1) > 1e-6                 # (N, P)
    assert 0 < int(changed.sum(1).max()) <= 10
    top = p[..., 1:].amax(-1).topk(10, dim=1).indices
    for i in range(2):
        assert set(torch.nonzero(changed[i]).flatten().tolist()) <= set(top[i].tolist())
    torch.testing.assert_close(mil.sum(-1), torch.ones(2, mil.shape[1]))


@pytest.fixture(scope="module")
def weak_synth(tmp_path_factory):
    """12 synthetic 256² fields: half of the train images weak (image labels only), 30% of boxes dropped."""
    from cyto_edge.synth.options import SynthOptions
    from cyto_edge.synth.writer import generate

    out = tmp_path_factory.mktemp("weak_synth") / "synth"
    generate(out, SynthOptions(images=12, size=256, seed=4, slide=False, drop=0.3, jitter=0.1, weak_fraction=0.5,
                               test_fraction=0.2))
    return out


def _fast(root, tmp, name, steps=4):
    return [f"data.root={root}", f"out_dir={tmp}", f"name={name}", "workers=0", "tensorboard=false", "threads=1",
            "schedule.epochs=2", f"schedule.steps_per_epoch={steps // 2}", "optim.batch_size=4",
            "data.val_fraction=0.2", "model.input_size=128", "mil.proposals=16", "mil.roi_size=3", "mil.hidden=32",
            "mil.reduce=8", "mil.bag_proposals=64", "mil.pseudo_start=0.5", "mil.pseudo_threshold=0.0", "mil.weak_bags=2",
            "eval.tile_overlap=32"]


def test_training_component_end_to_end(weak_synth, tmp_path):
    """MultiBox + L_cls + L_ref (+ pseudo-boxes on weak crops from half-way), the head and its EMA saved with
    the checkpoint, validation re-scored through the MIL output, resume, and the model rebuilt from the file."""
    from cyto_edge.train.checkpoint import load_checkpoint
    from cyto_edge.train.components import build_components
    from cyto_edge.train.config import load_config
    from cyto_edge.train.loop import Trainer
    from cyto_edge.train.mil import MilComponent, inference_model_from_checkpoint, mil_state

    cfg = load_config("student_mil", _fast(weak_synth, tmp_path, "m") + ["model.name=tiny", "model.kwargs={}"])
    comps = build_components(cfg)
    assert [type(c) for c in comps] == [MilComponent]
    res = Trainer(cfg, components=comps).run()
    rows = (tmp_path / "m" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for col in ("train_mil_cls", "train_mil_ref", "train_mil_pseudo", "train_multibox", "val_map50",
                "train__mil_field_mu_neg"):
        assert col in header, col
    last = dict(zip(header, rows[-1].split(",")))
    assert float(last["train_mil_cls"]) > 0 and float(last["train_mil_ref"]) > 0
    assert float(last["train__mil_pseudo_boxes"]) > 0              # threshold 0: every weak crop gets pseudo-boxes
    ck = load_checkpoint(res["last"])
    sd = mil_state(ck)
    assert sd is not None and sd["ema"] is not None and sd["meta"]["mode"] == "ssd"
    model = inference_model_from_checkpoint(ck)
    assert model.rescore_weight == 0.5 and model.topk == 16
    with torch.no_grad():
        outs = model(torch.zeros(1, 3, 128, 128))
    assert len(outs) == 3 and outs[2].shape == outs[1].shape
    # resume: the head comes back and training continues to the new end
    cfg2 = load_config("student_mil", _fast(weak_synth, tmp_path, "m", steps=6) + ["model.name=tiny", "model.kwargs={}"])
    res2 = Trainer(cfg2, resume=True, components=build_components(cfg2)).run()
    assert res2["steps"] == 6
    assert mil_state(load_checkpoint(res2["last"]))["ema_updates"] > sd["ema_updates"]


def test_mil_config_errors_name_the_field(weak_synth, tmp_path):
    from cyto_edge.errors import BadInput
    from cyto_edge.train.components import build_components
    from cyto_edge.train.config import load_config
    from cyto_edge.train.loop import Trainer

    for bad, msg in (("mil.level=9", "mil.level"), ("mil.refine_stages=0", "mil.refine_stages")):
        cfg = load_config("student_mil", _fast(weak_synth, tmp_path, "bad") + ["model.name=tiny", "model.kwargs={}", bad])
        with pytest.raises(BadInput, match=msg):
            Trainer(cfg, components=build_components(cfg)).setup()


def test_mil_and_oicr_learn_to_localise_from_image_labels_alone():
    """Bags of 40 regions whose features are noise, except that a bag labelled with class c holds one region
    carrying c's pattern; trained on bag labels only (eq. 15 + eq. 16), the refined top region of each
    labelled class is the planted one far above chance (1/40). The region features here stand in for
    RoIAlign features of a trained backbone: on synthetic fields with a backbone trained from scratch on
    image labels alone, localisation stayed at chance within minutes of CPU training (see the README)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    C, R, D = 4, 40, 32
    head = MilHead(8, C, roi_size=1, hidden=D, reduce=0, refine_stages=2)
    protos = torch.randn(C, D) * 1.5
    g = torch.arange(R, dtype=torch.float32)
    boxes = torch.stack([g * 20, torch.zeros(R), g * 20 + 10, torch.full((R,), 10.0)], -1)   # disjoint regions

    def bags(n):
        h, y, planted = torch.randn(n, R, D), torch.zeros(n, C), []
        for i in range(n):
            j = -1
            if rng.random() < 0.7:                      # 30% of bags hold no labelled object
                c, j = int(rng.integers(C)), int(rng.integers(R))
                y[i, c] = 1.0
                h[i, j] += protos[c]
            planted.append(j)
        return h, y, planted

    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(200):
        h, y, _ = bags(8)
        out = oicr_losses(*head.streams(h), boxes[None].expand(8, -1, -1), torch.ones(8, R, dtype=torch.bool), y)
        opt.zero_grad()
        (out["cls"] + out["ref"]).backward()
        opt.step()
    with torch.no_grad():
        h, y, planted = bags(200)
        q = head.refined_probs(h)                                                       # (200, R, C+1)
        found = [int(q[i, :, int(y[i].argmax()) + 1].argmax()) == j for i, j in enumerate(planted) if j >= 0]
    assert np.mean(found) > 0.8, np.mean(found)


def test_local_distillation_and_mil_train_together(weak_synth, tmp_path):
    """L = MultiBox + L_dis + L_cls + L_ref: a `distill` recipe with both sections builds both components."""
    from cyto_edge.train.components import build_components
    from cyto_edge.train.config import load_config
    from cyto_edge.train.distill import LocalDistillation
    from cyto_edge.train.loop import Trainer
    from cyto_edge.train.mil import MilComponent

    fast = _fast(weak_synth, tmp_path, "t", steps=2) + ["model.name=tiny", "model.kwargs={}", "data.val_fraction=0"]
    teacher = Trainer(load_config("tiny", [s for s in fast if not s.startswith("mil.")])).run()["last"]
    cfg = load_config("student_ld_mil", _fast(weak_synth, tmp_path, "s", steps=2)
                      + ["model.name=tiny", "model.kwargs={width: 8}", "data.val_fraction=0", f"distill.teacher={teacher}"])
    comps = build_components(cfg)
    assert [type(c) for c in comps] == [LocalDistillation, MilComponent]
    Trainer(cfg, components=comps).run()
    header = (tmp_path / "s" / "metrics.csv").read_text().splitlines()[0]
    for col in ("train_multibox", "train_ld_fea", "train_ld_att", "train_mil_cls", "train_mil_ref"):
        assert col in header, col
