"""MultiBox matching, encoding and hard negative mining on small hand-checked cases."""
import numpy as np
import torch

from cyto_edge.runtime.decode import decode_boxes
from cyto_edge.runtime.priors import PriorSpec, make_priors
from cyto_edge.train.losses.multibox import MultiBoxLoss, encode, match


def _priors():
    return torch.from_numpy(make_priors(PriorSpec(input_size=(100, 100), feature_sizes=[(4, 4), (2, 2)],
                                                  aspect_ratios=[[2.0], [2.0]], s_min=0.2, s_max=0.6)))


def test_each_gt_gets_its_best_prior_even_below_threshold():
    pri = _priors()
    gt = torch.tensor([[[0.0, 0.0, 0.08, 0.08]]])        # tiny box: no prior reaches IoU 0.5
    boxes, labels = match(gt, torch.tensor([[2]]), torch.tensor([[True]]), pri, 0.5)
    assert int((labels > 0).sum()) == 1
    assert int(labels[labels > 0][0]) == 3               # class 2 -> target 3 (0 is background)


def test_encode_matches_numpy_decoder_inverse():
    pri = _priors()
    gt = torch.tensor([[[0.1, 0.2, 0.5, 0.6]]]).expand(1, pri.shape[0], 4)
    t = encode(gt, pri, (0.1, 0.1, 0.2, 0.2))
    back = decode_boxes(t[0].numpy(), pri.numpy(), (0.1, 0.1, 0.2, 0.2), (1, 1))
    np.testing.assert_allclose(back, gt[0].numpy(), atol=1e-5)


def test_perfect_regression_has_zero_loc_loss_and_negatives_are_3_to_1():
    pri = _priors()
    P = pri.shape[0]
    gt_boxes = torch.tensor([[[0.1, 0.1, 0.45, 0.45], [0.5, 0.5, 0.95, 0.95]]])
    gt_labels = torch.tensor([[0, 1]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    matched, target = match(gt_boxes, gt_labels, valid, pri, 0.5)
    loc = encode(matched, pri, (0.1, 0.1, 0.2, 0.2))
    logits = torch.zeros(1, P, 3)
    loss = MultiBoxLoss(pri, min_negatives=0)
    out = loss(loc, logits, gt_boxes, gt_labels, valid)
    npos = int((target > 0).sum())
    assert npos >= 2 and float(out["num_pos"]) == npos
    assert float(out["loc"]) < 1e-6
    # uniform logits: every prior's CE is log(3); (npos + 3 npos) of them counted, divided by npos
    assert abs(float(out["conf"]) - 4 * np.log(3)) < 1e-4


def test_weak_images_do_not_contribute():
    pri = _priors()
    P = pri.shape[0]
    gt_boxes = torch.tensor([[[0.1, 0.1, 0.45, 0.45]]]).repeat(2, 1, 1)
    gt_labels = torch.zeros(2, 1, dtype=torch.long)
    valid = torch.ones(2, 1, dtype=torch.bool)
    torch.manual_seed(0)
    loc, logits = torch.randn(2, P, 4), torch.randn(2, P, 3)
    loss = MultiBoxLoss(pri)
    both = loss(loc, logits, gt_boxes, gt_labels, valid, torch.tensor([True, True]))
    one = loss(loc, logits, gt_boxes, gt_labels, valid, torch.tensor([True, False]))
    single = loss(loc[:1], logits[:1], gt_boxes[:1], gt_labels[:1], valid[:1])
    assert float(one["num_pos"]) == float(single["num_pos"]) == float(both["num_pos"]) / 2
    torch.testing.assert_close(one["multibox"], single["multibox"])


def test_empty_image_still_mines_negatives_and_ignored_objects_are_not_negatives():
    pri = _priors()
    P = pri.shape[0]
    logits = torch.zeros(1, P, 3)
    logits[..., 1] = 5.0                                   # confident false positives everywhere
    loss = MultiBoxLoss(pri, min_negatives=8)
    none = torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.bool)
    out = loss(torch.zeros(1, P, 4), logits, *none)
    assert float(out["conf"]) > 0 and float(out["num_pos"]) == 0
    # an ignored (cut) object: priors overlapping it (IoU >= 0.4) are excluded from the negatives
    loss = MultiBoxLoss(pri, min_negatives=P)
    out = loss(torch.zeros(1, P, 4), logits, *none)
    ign_box = torch.tensor([[[0.0, 0.0, 0.5, 0.5]]])
    out_ign = loss(torch.zeros(1, P, 4), logits, ign_box, torch.zeros(1, 1, dtype=torch.long),
                   torch.zeros(1, 1, dtype=torch.bool), gt_ignore=torch.ones(1, 1, dtype=torch.bool))
    assert float(out_ign["conf"]) < float(out["conf"])
