"""Local distillation (LD-WSCCD eq. 8-14), following the focal distillation it builds on
(FGD: Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022).

Per matched feature level, teacher features F^T (N, C, H, W), student features F^S mapped by the
adaptation layer f (a 1x1 convolution to the teacher's channels, then bilinear resizing when the maps
differ in size):

    eq. 9   M_ij = 1 if (i, j) lies inside a ground-truth box projected to the level, else 0
    eq. 10  G^S(F) = 1/C sum_c |F_c|            (H, W)    G^C(F) = 1/(HW) sum_ij |F_ij|   (C,)
    eq. 11  A^S(F) = H W softmax(G^S / T)                A^C(F) = C softmax(G^C / T)
    eq. 12  L_fea = alpha sum_kij M_ij S_ij A^S_ij A^C_k (F^T_kij - f(F^S)_kij)^2
                  + beta  sum_kij (1 - M_ij) S_ij A^S_ij A^C_k (F^T_kij - f(F^S)_kij)^2
    eq. 13  L_att = gamma (l(A^S_t, A^S_s) + l(A^C_t, A^C_s)),   l = mean absolute error
    eq. 14  L_dis = L_fea + L_att, summed over the matched levels

Where the text is unnormalised or silent, FGD is followed:
1. eq. 12's sums carry FGD's scale mask S: inside a box S = 1 / (h_r w_r) (box area in cells; the
   smallest box wins where boxes overlap), in the background S = 1 / N_bg. Without it the sums grow
   with the number and size of objects and the background swamps the foreground.
2. The sums are over C, H, W and averaged over the batch (FGD divides by the batch size).
3. The attention masks of eq. 12 are the teacher's (the text says so); A^S, A^C of eq. 11 use the
   absolute feature values, with T = 0.5 by default (FGD's); f maps student -> teacher channels (FGD's
   "align" layer; eq. 8's wording is ambiguous about the direction).
4. A box smaller than a cell still marks the cell holding its centre (eq. 9 would mark none).
5. eq. 13 is the text's mean absolute error (FGD sums over channels/pixels; the weight gamma absorbs it).
Defaults for alpha, beta, gamma, T come from the recorded sweep on synthetic data (README).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention(feat: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """eq. 10-11: (N, C, H, W) -> spatial A^S (N, H, W) and channel A^C (N, C)."""
    N, C, H, W = feat.shape
    value = feat.abs()
    gs = value.mean(dim=1)                                                   # (N, H, W)
    gc = value.mean(dim=(2, 3))                                              # (N, C)
    a_s = H * W * F.softmax((gs / temperature).reshape(N, -1), dim=1).reshape(N, H, W)
    a_c = C * F.softmax(gc / temperature, dim=1)
    return a_s, a_c


def foreground_masks(boxes: Tensor, present: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """eq. 9 with FGD's scale mask. boxes (N, G, 4) normalized xyxy, present (N, G) bool.

    Returns M (N, H, W) in {0, 1} and S (N, H, W): 1/area(cells) of the smallest box covering a cell,
    1/N_bg on the background.
    """
    N = boxes.shape[0]
    H, W = size
    ys = (torch.arange(H, device=boxes.device, dtype=boxes.dtype) + 0.5) / H  # cell centres
    xs = (torch.arange(W, device=boxes.device, dtype=boxes.dtype) + 0.5) / W
    x1, y1, x2, y2 = (boxes[..., i, None, None] for i in range(4))           # (N, G, 1, 1)
    inside = (xs[None, None, None, :] >= x1) & (xs[None, None, None, :] <= x2) & \
             (ys[None, None, :, None] >= y1) & (ys[None, None, :, None] <= y2)  # (N, G, H, W)
    # a box smaller than a cell still marks the cell holding its centre
    cx = ((boxes[..., 0] + boxes[..., 2]) / 2 * W).long().clamp(0, W - 1)
    cy = ((boxes[..., 1] + boxes[..., 3]) / 2 * H).long().clamp(0, H - 1)
    centre = torch.zeros_like(inside)
    n_idx, g_idx = torch.nonzero(present, as_tuple=True)
    centre[n_idx, g_idx, cy[n_idx, g_idx], cx[n_idx, g_idx]] = True
    inside = (inside | centre) & present[..., None, None]
    cells = inside.flatten(2).sum(-1).clamp(min=1).to(boxes.dtype)            # (N, G)
    scale = torch.where(inside, 1.0 / cells[..., None, None], torch.zeros((), dtype=boxes.dtype, device=boxes.device))
    fg_scale = scale.amax(dim=1) if boxes.shape[1] else torch.zeros(N, H, W, device=boxes.device)
    # smallest box wins: the largest 1/area
    m = (fg_scale > 0).to(boxes.dtype)
    bg = 1.0 - m
    n_bg = bg.flatten(1).sum(-1).clamp(min=1)
    s = fg_scale + bg / n_bg[:, None, None]
    return m, s


def match_levels(teacher_sizes: list[tuple[int, int]], student_sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(student level, teacher level) pairs matched by map size (= stride at equal input size); a student
    level without an equal-size teacher level takes the nearest one (its features are resized)."""
    pairs = []
    for s, ss in enumerate(student_sizes):
        t = min(range(len(teacher_sizes)), key=lambda i: abs(teacher_sizes[i][0] - ss[0]) + abs(teacher_sizes[i][1] - ss[1]))
        pairs.append((s, t))
    return pairs


class LocalDistillLoss(nn.Module):
    """L_dis over matched levels; holds the adaptation layers f (trained with the student)."""

    def __init__(self, student_channels: list[int], teacher_channels: list[int], pairs: list[tuple[int, int]],
                 temperature: float = 0.5, alpha: float = 1e-3, beta: float = 5e-4, gamma: float = 1e-3):
        super().__init__()
        self.pairs = pairs
        self.temperature, self.alpha, self.beta, self.gamma = temperature, alpha, beta, gamma
        self.adapt = nn.ModuleList([nn.Conv2d(student_channels[s], teacher_channels[t], 1) for s, t in pairs])
        for conv in self.adapt:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def level_loss(self, fs: Tensor, ft: Tensor, adapt: nn.Module, boxes: Tensor, present: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        fs = adapt(fs)
        if fs.shape[-2:] != ft.shape[-2:]:
            fs = F.interpolate(fs, size=ft.shape[-2:], mode="bilinear", align_corners=False)
        N = ft.shape[0]
        at_s, at_c = attention(ft, self.temperature)
        as_s, as_c = attention(fs, self.temperature)
        m, s = foreground_masks(boxes.to(ft.dtype), present, tuple(ft.shape[-2:]))
        w = (s * at_s)[:, None] * at_c[:, :, None, None]                      # (N, C, H, W), teacher's masks
        sq = (ft - fs).square() * w
        fg = (sq * m[:, None]).sum() / N
        bg = (sq * (1 - m)[:, None]).sum() / N
        att = F.l1_loss(as_s, at_s) + F.l1_loss(as_c, at_c)
        return fg, bg, att

    def forward(self, student_feats: list[Tensor], teacher_feats: list[Tensor], boxes: Tensor,
                present: Tensor) -> dict[str, Tensor]:
        """boxes (N, G, 4) normalized xyxy and present (N, G): every object box of the crops (eq. 9)."""
        fg = bg = att = student_feats[0].new_zeros(())
        for (s, t), adapt in zip(self.pairs, self.adapt):
            a, b, c = self.level_loss(student_feats[s].float(), teacher_feats[t].float().detach(), adapt, boxes, present)
            fg, bg, att = fg + a, bg + b, att + c
        l_fea = self.alpha * fg + self.beta * bg
        l_att = self.gamma * att
        return {"ld_fea": l_fea, "ld_att": l_att, "_ld_fg": fg.detach(), "_ld_bg": bg.detach(), "_ld_att_raw": att.detach()}
