"""MultiBox loss (LD-WSCCD eq. 5-7, SSD, Liu et al. 2016) with hard negative mining.

    L = (L_conf + alpha * L_loc) / N,   N = number of matched (positive) priors in the batch

Deviations from the printed text, toward SSD:
1. Eq. 6 is printed with the centre offsets run together; the targets are
   g^cx = (g^cx - d^cx) / (v0 d^w), g^cy = (g^cy - d^cy) / (v1 d^h), g^w = log(g^w / d^w) / v2,
   g^h = log(g^h / d^h) / v3 with SSD's variances v = (0.1, 0.1, 0.2, 0.2).
2. Eq. 7 is printed without the log on the positive term; it is the softmax cross-entropy
   L_conf = -sum_{i in Pos} log c_i^p - sum_{i in Neg} log c_i^0.
3. Neg is chosen by hard negative mining at 3:1 negatives to positives per image; an image with no
   positive still contributes `min_negatives` hard negatives (cytology crops are often all background,
   and a detector that never sees them learns false positives on normal cells).
4. Matching: each ground truth takes its best prior, then every prior with IoU >= 0.5 takes its best
   ground truth (SSD's "bipartite then per-prior" matching).
5. Objects cut by the crop border (less than half visible) are ignored: priors overlapping them
   (IoU >= 0.4) are neither positives nor negatives.
Images that carry only image-level labels (weak) are excluded through `box_mask`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cxcywh_to_xyxy(b: Tensor) -> Tensor:
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """(..., G, 4) x (P, 4) xyxy -> (..., G, P)."""
    lt = torch.maximum(a[..., :, None, :2], b[None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])).clamp(min=0)
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).clamp(min=0)
    return inter / (area_a[..., :, None] + area_b[None, :] - inter).clamp(min=1e-9)


def encode(matched_xyxy: Tensor, priors: Tensor, variances) -> Tensor:
    """(N, P, 4) normalized xyxy targets + (P, 4) cxcywh priors -> (N, P, 4) offsets."""
    cx = (matched_xyxy[..., 0] + matched_xyxy[..., 2]) / 2
    cy = (matched_xyxy[..., 1] + matched_xyxy[..., 3]) / 2
    w = (matched_xyxy[..., 2] - matched_xyxy[..., 0]).clamp(min=1e-6)
    h = (matched_xyxy[..., 3] - matched_xyxy[..., 1]).clamp(min=1e-6)
    return torch.stack([(cx - priors[:, 0]) / (variances[0] * priors[:, 2]),
                        (cy - priors[:, 1]) / (variances[1] * priors[:, 3]),
                        torch.log(w / priors[:, 2]) / variances[2],
                        torch.log(h / priors[:, 3]) / variances[3]], -1)


@torch.no_grad()
def match(gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, priors: Tensor, iou_threshold: float = 0.5):
    """Assign priors to ground truth.

    gt_boxes (N, G, 4) normalized xyxy; gt_labels (N, G) in 0..C-1; gt_valid (N, G) bool; priors (P, 4) cxcywh.
    Returns matched boxes (N, P, 4) and target classes (N, P) with 0 = background, c+1 = class c.
    """
    N, G = gt_labels.shape
    P = priors.shape[0]
    if G == 0:
        return gt_boxes.new_zeros(N, P, 4), gt_labels.new_zeros(N, P)
    iou = box_iou(gt_boxes, cxcywh_to_xyxy(priors))                    # (N, G, P)
    iou = iou.masked_fill(~gt_valid[..., None], -1.0)
    best_gt_iou, best_gt = iou.max(dim=1)                               # (N, P)
    best_prior = iou.argmax(dim=2)                                      # (N, G)
    n_idx, g_idx = torch.nonzero(gt_valid, as_tuple=True)
    p_idx = best_prior[n_idx, g_idx]
    best_gt[n_idx, p_idx] = g_idx                                       # each GT keeps its best prior
    best_gt_iou[n_idx, p_idx] = 2.0
    labels = torch.gather(gt_labels, 1, best_gt) + 1                    # (N, P)
    labels[best_gt_iou < iou_threshold] = 0
    boxes = torch.gather(gt_boxes, 1, best_gt[..., None].expand(N, P, 4))
    return boxes, labels


class MultiBoxLoss(torch.nn.Module):
    def __init__(self, priors: Tensor, variances=(0.1, 0.1, 0.2, 0.2), iou_threshold: float = 0.5,
                 neg_pos_ratio: int = 3, alpha: float = 1.0, min_negatives: int = 16):
        super().__init__()
        self.register_buffer("priors", priors.float(), persistent=False)
        self.variances = variances
        self.iou_threshold = iou_threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.alpha = alpha
        self.min_negatives = min_negatives

    def forward(self, loc: Tensor, logits: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor,
                box_mask: Tensor | None = None, gt_ignore: Tensor | None = None) -> dict[str, Tensor]:
        """loc (N, P, 4), logits (N, P, C+1); gt_* padded to G per image (see `match`);
        box_mask (N,) bool: images whose boxes supervise this loss (weak images excluded);
        gt_ignore (N, G) bool: objects cut by the crop border, neither positive nor negative."""
        N, P, _ = loc.shape
        if box_mask is None:
            box_mask = torch.ones(N, dtype=torch.bool, device=loc.device)
        matched, target = match(gt_boxes, gt_labels, gt_valid & box_mask[:, None], self.priors, self.iou_threshold)
        pos = (target > 0) & box_mask[:, None]                          # (N, P)
        num_pos = pos.sum()
        denom = num_pos.clamp(min=1).float()

        loc_t = encode(matched, self.priors, self.variances)
        loss_loc = F.smooth_l1_loss(loc[pos], loc_t[pos], reduction="sum", beta=1.0)

        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                             reduction="none").view(N, P)
        with torch.no_grad():
            neg_ce = ce.masked_fill(pos, -1.0)
            neg_ce[~box_mask] = -1.0
            if gt_ignore is not None and bool(gt_ignore.any()):
                iou_ign = box_iou(gt_boxes, cxcywh_to_xyxy(self.priors)).masked_fill(~gt_ignore[..., None], 0.0)
                neg_ce[iou_ign.amax(dim=1) >= 0.4] = -1.0
            k = (pos.sum(1) * self.neg_pos_ratio).clamp(min=self.min_negatives, max=P - 1)
            k = torch.where(box_mask, k, torch.zeros_like(k))
            order = neg_ce.argsort(dim=1, descending=True)
            rank = order.argsort(dim=1)
            neg = (rank < k[:, None]) & ~pos & box_mask[:, None] & (neg_ce >= 0)
        loss_conf = (ce * (pos | neg).float()).sum()
        total = (loss_conf + self.alpha * loss_loc) / denom
        return {"multibox": total, "loc": loss_loc / denom, "conf": loss_conf / denom,
                "num_pos": num_pos.float()}
