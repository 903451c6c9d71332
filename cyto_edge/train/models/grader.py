"""The learned FOV grader (papers/global-local-attention-roi-grading.md): weakly supervised, FOV labels only.

For one FOV with n_c cells (crops, in raster order of their box centres):
- a CNN (a classifier backbone of `classifier.py`) gives each cell a pooled feature x_i (GAP of stage 5,
  d_f) and its stage-4 feature map (d_c channels, m = h*w positions);
- global branch (eq. 1-2): a bidirectional LSTM with peephole connections over the sequence x_1..x_nc,
  then attention pooling a = softmax(w^T tanh(H)), h_ROI = tanh(H a^T)  (2*hidden values);
- local branch (eq. 3-6): a ViT per cell whose patches are the 1x1 positions of its stage-4 map (the
  paper's hybrid ViT): class token + E-projected positions + position embeddings, L pre-norm encoder
  layers (MSA, MLP with GELU), y = LN(z_L^0)  (D values);
- cross attention (eq. 7-9): query h_ROI W^Q, keys Y W^K, values Y W^V; s = softmax(q K^T / sqrt(d_k))
  is the per-cell CA score, a = s V and h~ = h_ROI + a (d_k = d_v = 2*hidden) feeds the FOV classifier
  (L_ROI, cross-entropy);
- CLAM-style cell branches (Lu et al. 2021): one binary classifier per FOV class on the cells' ViT
  features, trained on cells picked by their CA score (`select_cells`): L = L_ROI + lambda * L_cell.

Sources where the paper is terse: the LSTM is Graves' with diagonal peepholes, as in Zhou et al. 2016
(Att-BLSTM), i.e. exactly the ONNX LSTM operator with its P input; the weights are kept in ONNX layout
(gates i, o, f, c) so that the export is one LSTM node. The per-class sample-selection rule is the paper's
(NILM: every cell positive; class k: the N top-CA cells positive and the N bottom-CA cells negative for
branch k, and the N top cells negative for every less severe branch), written for C classes ordered by
severity, class 0 being the least severe. L_cell averages the C branch losses (a branch with no sample in
the batch adds 0).

Variable numbers of cells: `forward(cells (B, N, 3, S, S), mask (B, N) bool)`; padded cells never reach
the CNN (so they cannot change BatchNorm statistics), the backward LSTM starts at each FOV's last real
cell, and every softmax over cells is masked. A FOV with no cells gets `EMPTY_LOGITS`: NILM (class 0)
with probability 2/(C+1), never NaN.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cyto_edge.train.models.classifier import create_classifier

NEG = -1.0e4  # masked logit: exp underflows to exactly 0 in float32 beside any real logit


@dataclass
class GraderConfig:
    num_classes: int = 3
    crop: int = 64                       # cell crop side (px) fed to the CNN
    backbone: str = "small"              # a classifier architecture
    backbone_kw: dict = field(default_factory=lambda: {"width": 16, "dnl": False})
    hidden: int = 64                     # per LSTM direction; h_ROI has 2*hidden values
    vit_dim: int = 64                    # D
    vit_layers: int = 2                  # L
    vit_heads: int = 4
    local: bool = True                   # the ViT + cross-attention branch (eq. 3-9)
    peephole: bool = True                # eq. 1's W_c* terms
    sample_fraction: float = 0.10        # N = 10% of n_c

    def to_dict(self) -> dict:
        return asdict(self)


def masked_softmax(e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to `mask`; an all-masked row gives zeros (never NaN)."""
    return e.masked_fill(~mask, NEG).softmax(dim=-1) * mask.to(e.dtype)


def _reverse_index(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) index reversing each row's first `length` steps and leaving padding in place (an involution)."""
    t = torch.arange(T, device=lengths.device)[None, :]
    L = lengths[:, None]
    return torch.where(t < L, L - 1 - t, t)


def _lstm_direction(x, lengths, W, R, B, P, reverse: bool) -> torch.Tensor:
    """Eq. 1 for one direction. x (B, T, I); W (4H, I), R (4H, H), B (8H,), P (3H,) in ONNX gate order
    i, o, f, c (P: i, o, f). Returns (B, T, H); steps at or after a row's length are don't-care."""
    b, T, _ = x.shape
    H = R.shape[1]
    if reverse:
        idx = _reverse_index(lengths, T)
        x = x.gather(1, idx[..., None].expand_as(x))
    gx = x @ W.t() + B[:4 * H] + B[4 * H:]                    # (B, T, 4H)
    h = x.new_zeros(b, H)
    c = x.new_zeros(b, H)
    outs = []
    for t in range(T):
        gi, go, gf, gc = (gx[:, t] + h @ R.t()).chunk(4, dim=-1)
        i = torch.sigmoid(gi + P[:H] * c)                      # input gate (peephole on c_{t-1})
        f = torch.sigmoid(gf + P[2 * H:] * c)                  # forget gate (peephole on c_{t-1})
        c = f * c + i * torch.tanh(gc)
        o = torch.sigmoid(go + P[H:2 * H] * c)                 # output gate (peephole on c_t)
        h = o * torch.tanh(c)
        outs.append(h)
    y = torch.stack(outs, 1) if outs else x.new_zeros(b, 0, H)
    if reverse:
        y = y.gather(1, idx[..., None].expand_as(y))
    return y


class _OnnxBLSTM(torch.autograd.Function):
    """Export bridge: one ONNX LSTM node (bidirectional, peepholes, sequence_lens). Inference only."""

    @staticmethod
    def forward(ctx, x, seq_len, W, R, B, P, H: int):         # x (T, 1, I), seq_len (1,) int32
        y = torch.cat([_lstm_direction(x.transpose(0, 1), seq_len.long(), W[d], R[d], B[d], P[d], d == 1)
                       for d in (0, 1)], dim=-1)               # (1, T, 2H)
        return y

    @staticmethod
    def symbolic(g, x, seq_len, W, R, B, P, H: int):
        h0 = g.op("Constant", value_t=torch.zeros(2, 1, H))
        y, _, _ = g.op("LSTM", x, W, R, B, seq_len, h0, h0, P, direction_s="bidirectional",
                       hidden_size_i=H, outputs=3)              # y (T, 2, 1, H)
        y = g.op("Transpose", y, perm_i=[2, 0, 1, 3])          # (1, T, 2, H)
        shape = g.op("Constant", value_t=torch.tensor([1, -1, 2 * H], dtype=torch.int64))
        return g.op("Reshape", y, shape)                       # (1, T, 2H)


class BLSTM(nn.Module):
    """Bidirectional peephole LSTM (eq. 1). (B, T, I), lengths (B,) -> H (B, T, 2H): [h_fwd, h_bwd]."""

    def __init__(self, inp: int, hidden: int, peephole: bool = True):
        super().__init__()
        k = 1.0 / math.sqrt(hidden)
        self.hidden = hidden
        self.W = nn.Parameter(torch.empty(2, 4 * hidden, inp).uniform_(-k, k))
        self.R = nn.Parameter(torch.empty(2, 4 * hidden, hidden).uniform_(-k, k))
        b = torch.zeros(2, 8 * hidden)
        b[:, 2 * hidden:3 * hidden] = 1.0                      # forget-gate bias 1 (input-side half)
        self.B = nn.Parameter(b)
        if peephole:
            self.P = nn.Parameter(torch.empty(2, 3 * hidden).uniform_(-k, k))
        else:
            self.register_buffer("P", torch.zeros(2, 3 * hidden))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _OnnxBLSTM.apply(x.transpose(0, 1), lengths.to(torch.int32), self.W, self.R, self.B, self.P,
                                     self.hidden)
        return torch.cat([_lstm_direction(x, lengths, self.W[d], self.R[d], self.B[d], self.P[d], d == 1)
                          for d in (0, 1)], dim=-1)


class AttBLSTM(nn.Module):
    """Eq. 2: a = softmax(w^T tanh(H)) over the cells, h_ROI = tanh(H a^T). Returns (h_ROI (B, 2H), a (B, T))."""

    def __init__(self, inp: int, hidden: int, peephole: bool = True):
        super().__init__()
        self.lstm = BLSTM(inp, hidden, peephole)
        self.w = nn.Parameter(torch.randn(2 * hidden) / math.sqrt(2 * hidden))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor):
        H = self.lstm(x, lengths)                              # (B, T, 2H)
        a = masked_softmax(torch.tanh(H) @ self.w, mask)       # (B, T)
        return torch.tanh((a[..., None] * H).sum(1)), a


class EncoderLayer(nn.Module):
    """Eq. 4-5: z' = MSA(LN(z)) + z;  z = MLP(LN(z')) + z'."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"vit_dim {dim} must be a multiple of vit_heads {heads}")
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def msa(self, z: torch.Tensor) -> torch.Tensor:
        n, t, d = z.shape
        q, k, v = self.qkv(z).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)   # (n, heads, t, t)
        return self.proj((att @ v).transpose(1, 2).reshape(n, t, d))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self.msa(self.ln1(z)) + z
        return self.mlp(self.ln2(z)) + z


class CellViT(nn.Module):
    """Eq. 3-6 over one cell's stage-4 map: (n, d_c, h, w) -> y (n, D)."""

    def __init__(self, d_c: int, m: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.E = nn.Linear(d_c, dim)
        self.b_class = nn.Parameter(torch.zeros(1, 1, dim))
        self.E_pos = nn.Parameter(torch.randn(1, m + 1, dim) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        b = fmap.flatten(2).transpose(1, 2)                    # (n, m, d_c): the 1x1 patches
        z = torch.cat([self.b_class.expand(b.shape[0], -1, -1), self.E(b)], 1) + self.E_pos   # eq. 3
        for layer in self.layers:
            z = layer(z)
        return self.ln(z[:, 0])                                # eq. 6


class CellEncoder(nn.Module):
    """CNN on cell crops: (n, 3, S, S) -> (x (n, d_f) GAP of stage 5, stage-4 map (n, d_c, h, w));
    h = S/8 with the small stem, S/16 with the imagenet stem."""

    def __init__(self, cfg: GraderConfig):
        super().__init__()
        self.cnn = create_classifier(cfg.backbone, num_classes=1, **cfg.backbone_kw)
        self.cnn.fc = nn.Identity()
        self.d_f, self.d_c = self.cnn.stage_channels[3], self.cnn.stage_channels[2]
        with torch.no_grad():
            was = self.cnn.training
            self.cnn.eval()
            self.m = int(self.cnn.stage_maps(torch.zeros(1, 3, cfg.crop, cfg.crop))[2][0, 0].numel())
            self.cnn.train(was)

    def forward(self, crops: torch.Tensor):
        maps = self.cnn.stage_maps(crops)
        return maps[3].mean(dim=(2, 3)), maps[2]


class FOVGrader(nn.Module):
    def __init__(self, cfg: GraderConfig):
        super().__init__()
        if cfg.num_classes < 2:
            raise ValueError("a grader needs at least two FOV classes")
        self.cfg = cfg
        C, h2 = cfg.num_classes, 2 * cfg.hidden
        self.encoder = CellEncoder(cfg)
        self.global_branch = AttBLSTM(self.encoder.d_f, cfg.hidden, cfg.peephole)
        if cfg.local:
            self.vit = CellViT(self.encoder.d_c, self.encoder.m, cfg.vit_dim, cfg.vit_layers, cfg.vit_heads)
            self.WQ = nn.Linear(h2, h2, bias=False)
            self.WK = nn.Linear(cfg.vit_dim, h2, bias=False)
            self.WV = nn.Linear(cfg.vit_dim, h2, bias=False)
            self.cell_head = nn.Linear(cfg.vit_dim, 2 * C)   # C binary branches
        self.head = nn.Linear(h2, C)
        empty = torch.zeros(C)
        empty[0] = math.log(2.0)                               # NILM, probability 2/(C+1)
        self.register_buffer("empty_logits", empty)

    def encode(self, crops: torch.Tensor):
        """(n, 3, S, S) -> (x (n, d_f), y (n, D) or None)."""
        x, fmap = self.encoder(crops)
        return x, (self.vit(fmap) if self.cfg.local else None)

    def forward(self, cells: torch.Tensor, mask: torch.Tensor) -> dict:
        """cells (B, N, 3, S, S) normalised, mask (B, N) bool -> dict (see `head_forward`)."""
        b, n = mask.shape
        x = cells.new_zeros(b, n, self.encoder.d_f)
        if not bool(mask.any()):
            return self.head_forward(x, cells.new_zeros(b, n, self.cfg.vit_dim) if self.cfg.local else None, mask)
        xv, fmap = self.encoder(cells[mask])                  # only real cells reach the CNN
        return self.forward_features(x.masked_scatter(mask[..., None], xv), fmap, mask)

    def forward_features(self, x: torch.Tensor, fmap: torch.Tensor, mask: torch.Tensor) -> dict:
        """From CNN outputs: x (B, N, d_f) pooled features, fmap (n_real, d_c, h, w) stage-4 maps of the
        real cells in mask order, mask (B, N). Training with a frozen CNN caches these."""
        y = None
        if self.cfg.local:
            y = x.new_zeros(*mask.shape, self.cfg.vit_dim)
            if len(fmap):
                y = y.masked_scatter(mask[..., None], self.vit(fmap))
        return self.head_forward(x, y, mask)

    def head_forward(self, x: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor) -> dict:
        """x (B, N, d_f), y (B, N, D), mask (B, N) -> logits (B, C), probs (B, C), cell_scores (B, N)
        (CA score, eq. 9; the Att-BLSTM weights when there is no local branch), cell_logits (B, N, C, 2)."""
        lengths = mask.sum(1)
        h_roi, a_global = self.global_branch(x, mask, lengths)
        out = {"h_roi": h_roi}
        if self.cfg.local:
            q = self.WQ(h_roi)                                 # (B, dk)
            e = (self.WK(y) @ q[..., None]).squeeze(-1) / math.sqrt(q.shape[-1])   # (B, N)
            s = masked_softmax(e, mask)                        # eq. 9
            a = (s[..., None] * self.WV(y)).sum(1)             # eq. 7
            feat, scores = h_roi + a, s                        # eq. 8
            out["cell_logits"] = self.cell_head(y).reshape(y.shape[0], y.shape[1], self.cfg.num_classes, 2)
            out["y"] = y
        else:
            feat, scores = h_roi, a_global
        has = mask.any(1, keepdim=True)
        logits = torch.where(has, self.head(feat), self.empty_logits.expand(mask.shape[0], -1))
        out.update(logits=logits, probs=logits.softmax(-1), cell_scores=scores)
        return out


def num_samples(n_cells: int, fraction: float = 0.10) -> int:
    """The paper's N = n_c x 10%, rounded half up, at least 1, and at most n_c // 2 (top and bottom disjoint)."""
    if n_cells < 2:
        return 0
    return min(max(int(math.floor(fraction * n_cells + 0.5)), 1), n_cells // 2)


def select_cells(scores: torch.Tensor, label: int, fraction: float = 0.10) -> list[tuple[int, torch.Tensor, int]]:
    """The paper's sample-selection rule for one FOV of class `label` (0 = least severe, NILM).

    scores (n,) CA scores of its real cells. Returns (branch, cell indices, target) triples: target 1 =
    positive (in the class), 0 = negative. NILM: every cell positive for branch 0. Class k > 0: the N
    top-scored cells positive and the N bottom-scored cells negative for branch k, and the N top cells
    negative for each branch j < k."""
    n = int(scores.numel())
    if label == 0:
        return [(0, torch.arange(n, device=scores.device), 1)] if n else []
    N = num_samples(n, fraction)
    if N == 0:
        return []
    order = torch.argsort(scores.detach(), descending=True, stable=True)
    top, bottom = order[:N], order[n - N:]
    return [(label, top, 1), (label, bottom, 0)] + [(j, top, 0) for j in range(label)]


def cell_loss(out: dict, mask: torch.Tensor, labels: torch.Tensor, fraction: float = 0.10) -> torch.Tensor:
    """L_cell = (1/C) sum_k CE_k over the cells the rule gives branch k across the batch."""
    C = out["cell_logits"].shape[2]
    per_branch: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(C)]
    for i in range(mask.shape[0]):
        real = mask[i].nonzero().squeeze(1)
        logits_i = out["cell_logits"][i, real]                 # (n, C, 2)
        for k, idx, target in select_cells(out["cell_scores"][i, real], int(labels[i]), fraction):
            per_branch[k].append((logits_i[idx, k], torch.full((len(idx),), target, dtype=torch.long,
                                                               device=mask.device)))
    total = out["cell_logits"].new_zeros(())
    for items in per_branch:
        if items:
            total = total + F.cross_entropy(torch.cat([z for z, _ in items]), torch.cat([t for _, t in items]))
    return total / C


def grader_loss(out: dict, mask: torch.Tensor, labels: torch.Tensor, lam: float = 0.25,
                fraction: float = 0.10) -> tuple[torch.Tensor, dict]:
    """L = L_ROI + lambda * L_cell. Returns (loss, {"roi": float, "cell": float})."""
    l_roi = F.cross_entropy(out["logits"], labels)
    if lam > 0 and "cell_logits" in out:
        l_cell = cell_loss(out, mask, labels, fraction)
    else:
        l_cell = l_roi.new_zeros(())
    return l_roi + lam * l_cell, {"roi": float(l_roi.detach()), "cell": float(l_cell.detach())}
