"""MIL detector losses (LD-WSCCD eq. 15-16), following OICR (Tang et al., "Multiple Instance Detection
Network with Online Instance Classifier Refinement", CVPR 2017) where the text is garbled.

A bag is one image (or one crop whose labels are exactly known) with R proposals, mask (N, R) marking real
ones (bags are padded to a common R).

Basic MIL detector (WSDDN/OICR): region scores x_rc = softmax_c(x^cls)_rc · softmax_r(x^det)_rc, image
score μ_c = Σ_r x_rc. Because each class column of softmax_r sums to 1 over the regions and the class
softmax is ≤ 1, μ_c ∈ [0, 1]: a valid probability.
Deviation: the class stream has a background column (softmax over C+1, column 0 dropped from x). WSDDN's
C-way class softmax forces every region to be some class, so μ cannot be ~0 for every class at once; in
cytology most fields hold no labelled abnormality (y = 0), and without the background column a model
trained from scratch stays at the uniform μ_c = 1/C (measured: no learning in 200 steps on 16 fields).

eq. 15 as printed, -Σ_c {y_c log μ_c + (1 - y_c)(1 - log μ_c)}, is not a cross-entropy (the negative term
grows without bound as μ_c -> 0 and has the wrong sign). We use the standard multi-label binary
cross-entropy of OICR / WSDDN:

    L_cls = -Σ_c [y_c log μ_c + (1 - y_c) log(1 - μ_c)]      (summed over classes, averaged over bags)

Refinement (eq. 16, OICR's online instance classifier refinement). Stage k (1..K) scores every region over
C+1 classes (column 0 background). Its targets come from stage k-1 (stage 0 = the basic detector's x_r):
for each class c present in the bag the top-scoring region j_c = argmax_r x^{k-1}_{rc} is a seed; a region
whose best-overlapping seed has IoU ≥ 0.5 takes that seed's class, any other region is background; every
region is weighted by the score of its best-overlapping seed, w_r = x^{k-1}_{j_c c} (the printed
w_j^k = χ_{Cjc}^{k-1}). Then

    L_ref^k = -1/|R| Σ_r w_r log x^k_{r y_r},        L_ref = Σ_k L_ref^k  (averaged over bags)

Additions for mixed supervision (documented choices, not in the paper):
1. In a bag with boxes (a boxed training crop) the ground-truth boxes are seeds too, with weight 1.
2. A bag with no class present (a field with no labelled abnormality) has no seed: every region is
   background with weight 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cyto_edge.train.losses.multibox import box_iou

EPS = 1e-6


def mil_scores(cls_logits: Tensor, det_logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """cls (N, R, C+1) (column 0 background) and det (N, R, C) stream logits, mask (N, R) -> region scores
    x (N, R, C), image scores μ (N, C) in [0, 1]."""
    sc = F.softmax(cls_logits.float(), dim=-1)[..., 1:]
    det = det_logits.float().masked_fill(~mask[..., None], float("-inf"))
    sd = F.softmax(det, dim=1).masked_fill(~mask[..., None], 0.0)                      # over regions
    x = sc * sd
    return x, x.sum(1).clamp(0.0, 1.0)


def image_loss(mu: Tensor, y: Tensor, bag_mask: Tensor | None = None) -> Tensor:
    """Multi-label BCE of μ (N, C) against y (N, C) in {0, 1}: summed over classes, mean over bags."""
    per = F.binary_cross_entropy(mu.clamp(EPS, 1 - EPS), y.float(), reduction="none").sum(-1)   # (N,)
    if bag_mask is not None:
        return (per * bag_mask).sum() / bag_mask.sum().clamp(min=1)
    return per.mean()


@torch.no_grad()
def oicr_targets(prev: Tensor, boxes: Tensor, mask: Tensor, y: Tensor, iou_threshold: float = 0.5,
                 gt_boxes: Tensor | None = None, gt_labels: Tensor | None = None,
                 gt_valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Targets of one refinement stage.

    prev (N, R, C) the previous stage's class scores (x_r for stage 1; columns 1.. of the previous
    refinement softmax after), boxes (N, R, 4) xyxy, mask (N, R), y (N, C) image labels; optional seeds
    from ground truth gt_boxes (N, G, 4), gt_labels (N, G) in 0..C-1, gt_valid (N, G).
    Returns labels (N, R) in 0..C (0 = background) and weights (N, R)."""
    N, R, C = prev.shape
    labels = torch.zeros(N, R, dtype=torch.long, device=prev.device)
    weights = torch.ones(N, R, dtype=prev.dtype, device=prev.device)
    scores = prev.masked_fill(~mask[..., None], -1.0)
    for i in range(N):
        cls = torch.nonzero(y[i] > 0.5).flatten()                                       # present classes
        top = scores[i, :, cls].argmax(0)                                               # (c,) seed regions
        s_box, s_lab, s_w = boxes[i, top], cls, prev[i, top, cls]
        if gt_boxes is not None:
            g = gt_valid[i]
            s_box = torch.cat([s_box, gt_boxes[i, g].to(boxes.dtype)])
            s_lab = torch.cat([s_lab, gt_labels[i, g]])
            s_w = torch.cat([s_w, torch.ones(int(g.sum()), dtype=prev.dtype, device=prev.device)])
        if len(s_lab) == 0:
            continue                                                                    # all background, w = 1
        iou = box_iou(boxes[i], s_box)                                                  # (R, S)
        best_iou, best = iou.max(1)
        labels[i] = torch.where(best_iou >= iou_threshold, s_lab[best] + 1, torch.zeros_like(best))
        weights[i] = s_w[best]
    return labels, weights


def refine_loss(logits: Tensor, labels: Tensor, weights: Tensor, mask: Tensor,
                bag_mask: Tensor | None = None) -> Tensor:
    """eq. 16 for one stage: logits (N, R, C+1), labels (N, R), weights (N, R), mask (N, R) -> scalar."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    m = mask.float()
    per = (ce * weights * m).sum(1) / m.sum(1).clamp(min=1)                             # (N,)
    if bag_mask is not None:
        return (per * bag_mask).sum() / bag_mask.sum().clamp(min=1)
    return per.mean()


def oicr_losses(cls_logits: Tensor, det_logits: Tensor, ref_logits: list[Tensor], boxes: Tensor, mask: Tensor,
                y: Tensor, iou_threshold: float = 0.5, gt: tuple[Tensor, Tensor, Tensor] | None = None,
                bag_mask: Tensor | None = None) -> dict[str, Tensor]:
    """L_cls (eq. 15 as BCE) and L_ref (eq. 16 summed over the K stages) of a batch of bags."""
    x, mu = mil_scores(cls_logits, det_logits, mask)
    l_cls = image_loss(mu, y, bag_mask)
    l_ref = cls_logits.new_zeros(())
    prev = x.detach()
    for logits in ref_logits:
        labels, w = oicr_targets(prev, boxes, mask, y, iou_threshold, *(gt or (None, None, None)))
        l_ref = l_ref + refine_loss(logits, labels, w, mask, bag_mask)
        prev = F.softmax(logits.detach().float(), -1)[..., 1:]
    return {"cls": l_cls, "ref": l_ref, "mu": mu.detach()}


@torch.no_grad()
def pseudo_boxes(probs: Tensor, boxes: Tensor, mask: Tensor, y: Tensor, threshold: float, nms_iou: float = 0.45,
                 max_boxes: int = 20) -> tuple[Tensor, Tensor, Tensor]:
    """Pseudo ground truth from re-scored proposals: for each class c in the image labels y (N, C), the
    proposals with probs[..., c+1] ≥ threshold, class-wise NMS.

    probs (N, R, C+1), boxes (N, R, 4) xyxy (any unit), mask (N, R) -> boxes (N, G, 4), labels (N, G) in
    0..C-1, valid (N, G) (G ≥ 1, padded)."""
    from torchvision.ops import batched_nms

    N = probs.shape[0]
    out = []
    for i in range(N):
        fg = probs[i, :, 1:] * y[i][None, :] * mask[i][:, None].float()                  # (R, C)
        r, c = torch.nonzero(fg >= threshold, as_tuple=True)
        if len(r) == 0:
            out.append((boxes.new_zeros(0, 4), r.new_zeros(0)))
            continue
        keep = batched_nms(boxes[i, r].float(), fg[r, c].float(), c, nms_iou)[:max_boxes]
        out.append((boxes[i, r[keep]], c[keep]))
    G = max(1, max(len(b) for b, _ in out))
    gb = boxes.new_zeros(N, G, 4)
    gl = torch.zeros(N, G, dtype=torch.long, device=boxes.device)
    gv = torch.zeros(N, G, dtype=torch.bool, device=boxes.device)
    for i, (b, c) in enumerate(out):
        gb[i, :len(b)], gl[i, :len(b)], gv[i, :len(b)] = b, c, True
    return gb, gl, gv
