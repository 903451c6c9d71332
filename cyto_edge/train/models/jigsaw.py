"""The 3x3 jigsaw pretext network, its permutation set, and patch attention for image-level classes.

Spec: patch-self-supervised-attention-transfer.md (Chae et al.), sections 4.1-4.3. Its description of
the puzzle is brief ("nine patches with some space to avoid trivial solutions", "1,000 of the 9!
combinations", "weight-sharing"); the details follow the jigsaw source it builds on, Noroozi & Favaro,
"Unsupervised learning of visual representations by solving jigsaw puzzles" (ECCV 2016):

- permutation set (N&F Algorithm 1): greedy selection that starts from a random permutation and
  repeatedly adds the candidate of largest Hamming distance D to the set chosen so far.
  `criterion="average"` is Algorithm 1 as printed (D = sum of distances to the chosen ones); it reaches
  the largest *average* distance but leaves pairs at distance 2. `criterion="minimum"` (the default)
  uses D = the minimum distance to the chosen ones, which keeps the smallest pairwise distance large
  (6 for 100 permutations, 5 for 1000, against 2), the property N&F name as what makes the task hard
  and useful. `permutation_stats` reports both the minimum and the average.
- context-free network (N&F fig. 3): one trunk, its weights shared by the nine tiles (siamese), a
  per-tile fully connected layer (fc6, shared), the nine outputs concatenated, fc7 and a classifier
  over the permutation indices (fc8).
- shortcuts: gaps and random jitter between tiles, per-tile normalisation, random grayscale and
  per-channel jitter (see cyto_edge/train/pretrain.py, which cuts the puzzles).

Patch attention (Chae et al. section 4.3, fig. 3): the image is cut into Np = 3x3 patches, each
passed through the shared trunk -> (Np, C, h, w) features; global average pooling over (C, h, w) gives
one value per patch, z in R^Np; a fully connected layer with a sigmoid gives the patch weights
w = sigmoid(W z + b) in (0, 1)^Np, reshaped to (Np, 1, 1, 1) and multiplied into the patch features;
each re-weighted patch goes through GAP and a shared fully connected layer (the paper's green
blocks), the Np results are concatenated and a last fully connected layer gives the class logits.

Trunks (`build_trunk`): "rcan" / "plain" / "rcan-noca" (the classifiers of models/rcan.py without
their heads) or any registered detector name (its `backbone`). A trunk returns a list of feature maps;
the deepest is used. Its state-dict keys are recorded with the prefix they carry inside the target
model ("" for a classifier, "backbone." for a detector), so pretrained weights load by name.
"""
from __future__ import annotations

import functools
import itertools

import numpy as np
import torch
from torch import nn

from cyto_edge.errors import BadInput

GRID = 3
NUM_TILES = GRID * GRID


# --------------------------------------------------------------------------------- permutations

@functools.lru_cache(maxsize=1)
def _all_permutations() -> np.ndarray:
    return np.array(list(itertools.permutations(range(NUM_TILES))), dtype=np.int8)  # (9!, 9)


@functools.lru_cache(maxsize=8)
def hamming_permutations(n: int, seed: int = 0, criterion: str = "minimum") -> np.ndarray:
    """(n, 9) int64 permutations chosen greedily for a large Hamming distance (N&F Algorithm 1)."""
    allp = _all_permutations()
    if not 2 <= n <= len(allp):
        raise BadInput(f"--permutations must be in [2, {len(allp)}], got {n}")
    if criterion not in ("minimum", "average"):
        raise BadInput(f"unknown permutation criterion {criterion!r}; choose minimum or average")
    j = int(np.random.default_rng(seed).integers(len(allp)))
    chosen = [j]
    taken = np.zeros(len(allp), bool)
    acc = np.zeros(len(allp), np.int32) if criterion == "average" else np.full(len(allp), NUM_TILES, np.int32)
    for _ in range(n - 1):
        taken[j] = True
        d = (allp != allp[j]).sum(1, dtype=np.int32)   # Hamming distance of every candidate to the new one
        if criterion == "average":
            acc += d
        else:
            np.minimum(acc, d, out=acc)
        j = int(np.where(taken, -1, acc).argmax())
        chosen.append(j)
    return allp[chosen].astype(np.int64)


def permutation_stats(perms: np.ndarray) -> dict:
    """Size, uniqueness, minimum and average pairwise Hamming distance of a permutation set."""
    d = (perms[:, None, :] != perms[None, :, :]).sum(2)
    iu = np.triu_indices(len(perms), 1)
    return {"count": int(len(perms)), "unique": int(len({tuple(p) for p in perms.tolist()})),
            "min_hamming": int(d[iu].min()), "mean_hamming": round(float(d[iu].mean()), 3)}


# --------------------------------------------------------------------------------------- trunks

class Trunk(nn.Module):
    """A feature extractor that returns the deepest map (N, C, h, w); `prefix` is where its weights
    live inside the target model; `out_channels` is C."""

    def __init__(self, body: nn.Module, out_channels: int, prefix: str, arch: str):
        super().__init__()
        self.body = body
        self.out_channels = out_channels
        self.prefix = prefix
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        return f[-1] if isinstance(f, (list, tuple)) else f

    def target_state_dict(self) -> dict[str, torch.Tensor]:
        """The trunk's weights named as in the target model (a classifier's or a detector's keys)."""
        return {self.prefix + k: v.detach().clone() for k, v in self.body.state_dict().items()}


class _ClassifierBody(nn.Module):
    """A models/rcan.py classifier without its head; keys stay `stem.*`, `stages.*`."""

    def __init__(self, arch: str, **kw):
        super().__init__()
        from cyto_edge.train.models.rcan import build_classifier

        net = build_classifier(arch, 2, **kw)
        self.stem, self.stages = net.stem, net.stages
        self.out_channels = net.head[-1].in_features

    def forward(self, x):
        x = self.stem(x)
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        return out


def trunk_names() -> list[str]:
    from cyto_edge.train.models.rcan import ARCHS

    names = list(ARCHS)
    try:
        from cyto_edge.train.models import MODELS
        names += MODELS.names()
    except ImportError:  # the detector registry is not installed
        pass
    return names


def build_trunk(arch: str, **kw) -> Trunk:
    """A trunk by name: a classifier of models/rcan.py, or the backbone of a registered detector."""
    from cyto_edge.train.models.rcan import ARCHS

    if arch in ARCHS:
        body = _ClassifierBody(arch, **kw)
        return Trunk(body, body.out_channels, "", arch)
    try:
        from cyto_edge.train.models import MODELS, create_model
    except ImportError:
        MODELS = None
    if MODELS is None or arch not in MODELS:
        raise BadInput(f"unknown --arch {arch!r}; choose one of: {', '.join(trunk_names())}")
    det = create_model(arch, num_classes=1, **kw)
    return Trunk(det.backbone, int(det.backbone.out_channels[-1]), "backbone.", arch)


# ----------------------------------------------------------------------------------- jigsaw net

class JigsawNet(nn.Module):
    """Context-free network: tiles (N, 9, 3, t, t) -> permutation logits (N, num_perms).

    fc6 sees the tile's feature map pooled to `pool` x `pool` (not a global average): as in N&F, where
    fc6 takes the 3x3 conv5 map, the layout inside a tile (where a cell is cut by the tile's border) is
    what tells neighbouring tiles apart."""

    def __init__(self, trunk: Trunk, num_perms: int, fc6: int = 256, fc7: int = 512, dropout: float = 0.3,
                 pool: int = 3):
        super().__init__()
        self.trunk = trunk
        self.fc6 = nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(),
                                 nn.Linear(trunk.out_channels * pool * pool, fc6), nn.ReLU(inplace=True))
        self.fc7 = nn.Sequential(nn.Dropout(dropout), nn.Linear(NUM_TILES * fc6, fc7), nn.ReLU(inplace=True))
        self.fc8 = nn.Linear(fc7, num_perms)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        N, T = tiles.shape[:2]
        f = self.fc6(self.trunk(tiles.flatten(0, 1)))   # (N*9, fc6): the same weights for every tile
        return self.fc8(self.fc7(f.view(N, T * f.shape[1])))


# ------------------------------------------------------------------------------- patch attention

def split_patches(x: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """(N, C, H, W) -> (N, grid*grid, C, H//grid, W//grid), row-major; the remainder is cropped."""
    N, C, H, W = x.shape
    ph, pw = H // grid, W // grid
    if ph < 1 or pw < 1:
        raise ValueError(f"image {H}x{W} is smaller than the {grid}x{grid} patch grid")
    x = x[:, :, : ph * grid, : pw * grid].reshape(N, C, grid, ph, grid, pw)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(N, grid * grid, C, ph, pw)


class PatchAttention(nn.Module):
    """Chae et al. fig. 3: w = sigmoid(FC(GAP_{C,h,w}(F_i))) in (0, 1)^Np; F_i <- w_i F_i."""

    def __init__(self, num_patches: int = NUM_TILES):
        super().__init__()
        self.fc = nn.Linear(num_patches, num_patches)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # f: (N, Np, C, h, w)
        z = f.mean(dim=(2, 3, 4))                   # (N, Np) initial patch weights
        w = torch.sigmoid(self.fc(z))               # (N, Np)
        return f * w[:, :, None, None, None], w


class PatchAttentionClassifier(nn.Module):
    """Image (N, 3, H, W) -> 3x3 patches -> shared trunk -> [patch attention] -> per-patch FC -> concat
    -> FC -> logits (N, num_classes). `last_patch_weights` keeps (N, 9) from the last forward."""

    def __init__(self, trunk: Trunk, num_classes: int, attention: bool = True, patch_dim: int = 64,
                 grid: int = GRID, dropout: float = 0.2):
        super().__init__()
        self.trunk, self.grid = trunk, grid
        self.attention = PatchAttention(grid * grid) if attention else None
        self.patch_fc = nn.Sequential(nn.Linear(trunk.out_channels, patch_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(grid * grid * patch_dim, num_classes))
        self.last_patch_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = split_patches(x, self.grid)                       # (N, Np, 3, ph, pw)
        N, Np = p.shape[:2]
        f = self.trunk(p.flatten(0, 1))                       # (N*Np, C, h, w)
        f = f.view(N, Np, *f.shape[1:])                        # (N, Np, C, h, w)
        if self.attention is not None:
            f, w = self.attention(f)
            self.last_patch_weights = w.detach()
        g = self.patch_fc(f.mean(dim=(3, 4)))                 # (N, Np, patch_dim)
        return self.head(g.flatten(1))
