"""The MIL detector head (LD-WSCCD section D.3, after OICR: Tang et al., CVPR 2017) and the inference
model that carries it into the bundle.

    feat (N, C_l, H_l, W_l)   one student feature level (default: stride 16)
      -> 1x1 conv + ReLU (C_l -> `reduce` channels; a 336-channel level would make the first FC huge)
      -> RoIAlign over proposals (N, R, 4) xyxy in pixels of the image the features were computed on
      -> two FC layers + ReLU -> h (N, R, hidden)
      -> cls stream  (N, R, C+1) softmax over classes   } the basic MIL detector: x_r = σ(x^cls) ⊙ σ(x^det),
      -> det stream  (N, R, C)   softmax over regions   } μ_c = Σ_r x_rc (train/losses/mil.py, eq. 15)
      -> K refinement stages (N, R, C+1) each an FC + softmax (OICR; eq. 16)

At inference (MilDetector) the proposals are the decoded boxes of the SSD's top-K priors of each image;
the mean of the K refinement softmaxes is scattered back to those priors, the other priors keep the SSD's
softmax: the third output `mil` (N, P, C+1) that runtime/rescore.py mixes into the class scores.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from cyto_edge.runtime.priors import PriorSpec, level_shapes

BBOX_CLIP = math.log(1000.0 / 16)  # as runtime/decode.py


class MilHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, *, roi_size: int = 7, hidden: int = 256,
                 reduce: int = 64, refine_stages: int = 3):
        super().__init__()
        self.num_classes, self.roi_size, self.refine_stages = num_classes, roi_size, refine_stages
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, reduce, 1), nn.ReLU(inplace=True)) if reduce else nn.Identity()
        ch = reduce or in_channels
        self.fc = nn.Sequential(nn.Linear(ch * roi_size * roi_size, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.cls = nn.Linear(hidden, num_classes + 1)       # column 0 background (losses/mil.py)
        self.det = nn.Linear(hidden, num_classes)
        self.refine = nn.ModuleList([nn.Linear(hidden, num_classes + 1) for _ in range(refine_stages)])
        for m in [self.cls, self.det, *self.refine]:
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)

    def embed(self, feat: Tensor, boxes: Tensor, image_w: int) -> Tensor:
        """feat (N, C_l, H_l, W_l), boxes (N, R, 4) xyxy px of an image `image_w` px wide -> h (N, R, hidden)."""
        N, R = boxes.shape[:2]
        f = self.reduce(feat)
        idx = torch.arange(N, device=boxes.device, dtype=boxes.dtype).repeat_interleave(R)[:, None]
        rois = torch.cat([idx, boxes.reshape(-1, 4).to(f.dtype)], 1)                   # (N*R, 5)
        r = roi_align(f, rois, output_size=self.roi_size, spatial_scale=feat.shape[-1] / image_w,
                      sampling_ratio=2, aligned=True)                                   # (N*R, ch, s, s)
        return self.fc(r.flatten(1)).view(N, R, -1)

    def streams(self, h: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """h (N, R, hidden) -> cls logits (N, R, C+1), det logits (N, R, C), K refinement logits (N, R, C+1)."""
        return self.cls(h), self.det(h), [r(h) for r in self.refine]

    def refined_probs(self, h: Tensor) -> Tensor:
        """The inference score of OICR: the mean of the refinement stages' softmax, (N, R, C+1)."""
        return torch.stack([F.softmax(r(h), -1) for r in self.refine]).mean(0)


def decode(loc: Tensor, priors: Tensor, variances, size: tuple[int, int] = (1, 1)) -> Tensor:
    """torch twin of runtime/decode.decode_boxes: (…, 4) offsets + (…, 4) cxcywh priors -> xyxy in pixels of
    an input of `size` = (H, W) (pass priors in pixels and size (1, 1) for pixel priors)."""
    v = variances
    H, W = size
    cx = priors[..., 0] + loc[..., 0] * v[0] * priors[..., 2]
    cy = priors[..., 1] + loc[..., 1] * v[1] * priors[..., 3]
    w = priors[..., 2] * torch.exp(torch.clamp(loc[..., 2] * v[2], max=BBOX_CLIP))
    h = priors[..., 3] * torch.exp(torch.clamp(loc[..., 3] * v[3], max=BBOX_CLIP))
    return torch.stack([(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H], -1)


def top_proposals(loc: Tensor, logits: Tensor, priors: Tensor, variances, size: tuple[int, int], k: int):
    """The SSD's top-k priors of each image by best foreground probability.

    loc (N, P, 4), logits (N, P, C+1), priors (P, 4) normalized cxcywh -> indices (N, k), boxes (N, k, 4) xyxy
    px clipped to the input, SSD probabilities (N, P, C+1)."""
    probs = F.softmax(logits.float(), -1)
    k = min(k, probs.shape[1])
    idx = probs[..., 1:].amax(-1).topk(k, dim=1).indices                               # (N, k)
    sel_loc = torch.gather(loc.float(), 1, idx[..., None].expand(-1, -1, 4))
    boxes = decode(sel_loc, priors[idx], variances, size)
    H, W = size
    lim = torch.tensor([W, H, W, H], dtype=boxes.dtype, device=boxes.device)
    boxes = torch.minimum(boxes.clamp(min=0), lim)
    return idx, boxes, probs


def field_priors(spec: PriorSpec, feature_sizes: list[tuple[int, int]], image_hw: tuple[int, int],
                 levels: list[int] | None = None, anchors: list[int] | None = None) -> np.ndarray:
    """The model's priors laid over an image of any size (a whole field), in pixels.

    The model's anchor shapes (fractions of its input side S) become pixels (x S); centres spread over each
    level's actual map as make_priors does. `levels` / `anchors` select levels and anchors within a cell
    (default all, in the head's output order). Returns float32 (P', 4) cxcywh px."""
    S = min(spec.input_size)
    H, W = image_hw
    parts = []
    for lv, ((fh, fw), shapes) in enumerate(zip(feature_sizes, level_shapes(spec))):
        if levels is not None and lv not in levels:
            continue
        wh = shapes * S if anchors is None else shapes[anchors] * S                     # (A, 2) px
        cy, cx = np.meshgrid((np.arange(fh) + 0.5) * H / fh, (np.arange(fw) + 0.5) * W / fw, indexing="ij")
        c = np.repeat(np.stack([cx.ravel(), cy.ravel()], 1), len(wh), axis=0)
        parts.append(np.concatenate([c, np.tile(wh, (fh * fw, 1))], 1))
    return np.concatenate(parts, 0).astype(np.float32) if parts else np.zeros((0, 4), np.float32)


def cxcywh_to_xyxy_clipped(p: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    H, W = image_hw
    b = np.concatenate([p[:, :2] - p[:, 2:] / 2, p[:, :2] + p[:, 2:] / 2], 1)
    return np.clip(b, 0, [W, H, W, H]).astype(np.float32)


class MilDetector(nn.Module):
    """The detector with its MIL head, for evaluation and export: forward(x) -> loc, logits, mil.

    loc (N, P, 4), logits (N, P, C+1) as the SSD's; mil (N, P, C+1): the refined MIL distribution of the
    top-`topk` priors (scattered back to their places), the SSD's softmax elsewhere (runtime/rescore.py)."""

    def __init__(self, model: nn.Module, head: MilHead, *, level: int, topk: int, rescore_weight: float):
        super().__init__()
        self.model, self.head = model, head
        self.level, self.topk, self.rescore_weight = level, topk, rescore_weight

    # the detector's contract, delegated (train/evaluate.py, export)
    @property
    def spec(self):
        return self.model.spec

    @property
    def priors(self) -> Tensor:
        return self.model.priors

    @property
    def variances(self):
        return self.model.variances

    @property
    def prior_spec(self):
        return self.model.prior_spec

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def priors_numpy(self) -> np.ndarray:
        return self.model.priors_numpy()

    def forward(self, x: Tensor):
        loc, logits, feats = self.model(x, return_features=True)
        H, W = x.shape[-2:]
        idx, boxes, probs = top_proposals(loc, logits, self.model.priors, self.model.variances, (H, W), self.topk)
        ref = self.head.refined_probs(self.head.embed(feats[self.level], boxes, W))      # (N, k, C+1)
        K1 = probs.shape[-1]
        mil = probs.scatter(1, idx[..., None].expand(-1, -1, K1), ref.to(probs.dtype))
        return loc, logits, mil
