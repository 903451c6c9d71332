"""Residual channel attention classifier for multi-cell images (and its plain baselines).

Spec: interpretable-channel-attention-multicell.md (Wang et al.), section II-B.2, which uses the
residual channel attention of RCAN and cites it for the equations; they are taken from RCAN
(Zhang et al., ECCV 2018, "Image super-resolution using very deep residual channel attention networks"):

- channel attention (RCAN eq. 9-10): z_c = (1 / HW) sum_ij x_c(i, j);  s = f(W_U relu(W_D z));
  x^_c = s_c * x_c, with W_D a 1x1 conv reducing C -> C/r and W_U expanding back, f the sigmoid;
- residual channel attention block (RCAB, eq. 11-12): F_b = F_{b-1} + CA(X_b),
  X_b = W_2 relu(W_1 F_{b-1});
- residual group (eq. 6-7): F_g = F_{g-1} + W_g F_{g,B}: B RCABs, a conv and the short skip;
- residual in residual (eq. 5): F_DF = F_0 + W_LSC F_G: G groups, a conv and the long skip.

RCAN is a super-resolution network that keeps the resolution and has no normalisation. For image
classification (the paper bolts RCA onto DenseNet-121, which has batch norm) this module:
- puts the RIR at each of several stages, each stage entered through a strided conv that halves the
  resolution and raises the width (stem stride 4, stages at stride 4, 8, 16 by default);
- keeps batch norm after each conv of an RCAB (`norm=False` gives RCAN's un-normalised block);
- ends with global average pooling, dropout and one linear layer (logits, no softmax).

Baselines for the benchmark, same stem, widths and depth:
- `plain`: conv-BN-ReLU pairs, no skip connection, no attention;
- `rcan-noca`: the residual-in-residual structure with the channel attention removed.

Tensor contract: input float32 (N, 3, H, W), RGB, already normalised with the checkpoint's mean/std;
`forward` -> logits (N, num_classes); `features(x)` -> list of stage maps [(N, C_s, H/2^(s+2), W/2^(s+2))].
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cyto_edge.errors import BadInput

CHECKPOINT_FORMAT = "cyto-edge-classifier"


def _conv(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)


def _norm(c: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(c) if norm else nn.Identity()


class ChannelAttention(nn.Module):
    """RCAN eq. 9-10: GAP -> 1x1 conv C->C/r -> ReLU -> 1x1 conv C/r->C -> sigmoid -> rescale."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        mid = max(channels // reduction, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.down = nn.Conv2d(channels, mid, 1)
        self.up = nn.Conv2d(mid, channels, 1)
        self.last_weights: torch.Tensor | None = None  # (N, C) s of the last forward, for inspection

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        s = torch.sigmoid(self.up(torch.relu(self.down(self.pool(x)))))  # (N, C, 1, 1)
        self.last_weights = s.detach().flatten(1)
        return x * s


class RCAB(nn.Module):
    """Residual channel attention block (RCAN eq. 11-12); `attention=False` drops the CA."""

    def __init__(self, c: int, reduction: int = 8, norm: bool = True, attention: bool = True):
        super().__init__()
        self.body = nn.Sequential(_conv(c, c), _norm(c, norm), nn.ReLU(inplace=True), _conv(c, c), _norm(c, norm))
        self.ca = ChannelAttention(c, reduction) if attention else nn.Identity()

    def forward(self, x):
        return x + self.ca(self.body(x))


class ResidualGroup(nn.Module):
    """RCAN eq. 6-7: B blocks, a conv, and the short skip connection."""

    def __init__(self, c: int, blocks: int, reduction: int = 8, norm: bool = True, attention: bool = True):
        super().__init__()
        self.blocks = nn.Sequential(*[RCAB(c, reduction, norm, attention) for _ in range(blocks)])
        self.conv = _conv(c, c)

    def forward(self, x):
        return x + self.conv(self.blocks(x))


class ResidualInResidual(nn.Module):
    """RCAN eq. 5: G residual groups, a conv, and the long skip connection."""

    def __init__(self, c: int, groups: int, blocks: int, reduction: int = 8, norm: bool = True,
                 attention: bool = True):
        super().__init__()
        self.groups = nn.Sequential(*[ResidualGroup(c, blocks, reduction, norm, attention) for _ in range(groups)])
        self.conv = _conv(c, c)
        self.post = nn.Sequential(_norm(c, True), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.post(x + self.conv(self.groups(x)))


class PlainStage(nn.Module):
    """The baseline: as many conv-BN-ReLU pairs as an RIR stage has RCABs, no skips, no attention."""

    def __init__(self, c: int, groups: int, blocks: int, **_):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(groups * blocks):
            for _ in range(2):
                layers += [_conv(c, c), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class ChannelAttentionClassifier(nn.Module):
    """Stem (stride 4) + one downsampling conv and one RIR (or plain) body per stage + GAP + linear."""

    def __init__(self, num_classes: int, *, widths=(24, 48, 96), groups: int = 2, blocks: int = 2,
                 reduction: int = 8, norm: bool = True, body: str = "rir", attention: bool = True,
                 dropout: float = 0.2, in_channels: int = 3):
        super().__init__()
        w0 = widths[0]
        self.stem = nn.Sequential(_conv(in_channels, w0 // 2, 2), nn.BatchNorm2d(w0 // 2), nn.ReLU(inplace=True),
                                  _conv(w0 // 2, w0, 2), nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        stage_cls = {"rir": ResidualInResidual, "plain": PlainStage}[body]
        stages, cin = [], w0
        for i, w in enumerate(widths):
            down = (nn.Identity() if i == 0 else
                    nn.Sequential(_conv(cin, w, 2), nn.BatchNorm2d(w), nn.ReLU(inplace=True)))
            stages.append(nn.Sequential(down, stage_cls(w, groups=groups, blocks=blocks, reduction=reduction,
                                                        norm=norm, attention=attention)))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(cin, num_classes))
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, num_classes)
        return self.head(self.features(x)[-1])

    def attention_weights(self) -> list[torch.Tensor]:
        """The (N, C) channel weights of every CA module from the last forward (empty without CA)."""
        return [m.last_weights for m in self.modules() if isinstance(m, ChannelAttention) and
                m.last_weights is not None]


#: Classifier architectures by name -> constructor keyword arguments.
ARCHS: dict[str, dict] = {
    "rcan": {"body": "rir", "attention": True},
    "rcan-noca": {"body": "rir", "attention": False},
    "plain": {"body": "plain", "attention": False},
}


def build_classifier(arch: str, num_classes: int, **kw) -> ChannelAttentionClassifier:
    if arch not in ARCHS:
        raise BadInput(f"unknown classifier architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    return ChannelAttentionClassifier(num_classes, **{**ARCHS[arch], **kw})


def save_checkpoint(path: str | Path, model: nn.Module, *, arch: str, arch_kwargs: dict, classes: list[str],
                    mean, std, input_size: tuple[int, int], um_per_px: float | None = None,
                    extra: dict | None = None) -> Path:
    """A classifier checkpoint that `cyto-edge explain` (and anyone else) can rebuild without code.

    Images go in as RGB float in [0, 1], then (x - mean) / std per channel; `input_size` is (H, W) in
    pixels at `um_per_px` (crops of that size, never a resize of a whole field).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"format": CHECKPOINT_FORMAT, "version": 1, "arch": arch, "arch_kwargs": dict(arch_kwargs),
            "classes": list(classes), "num_classes": len(classes),
            "input": {"mean": [float(m) for m in mean], "std": [float(s) for s in std],
                      "size": [int(input_size[0]), int(input_size[1])], "colour": "rgb", "um_per_px": um_per_px},
            "state_dict": model.state_dict(), "extra": extra or {}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(ckpt: dict, source: str = "checkpoint") -> ChannelAttentionClassifier:
    """Rebuild the classifier of a checkpoint dict written by `save_checkpoint` (eval mode)."""
    try:
        model = build_classifier(ckpt["arch"], int(ckpt["num_classes"]), **ckpt.get("arch_kwargs", {}))
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise BadInput(f"{source}: not a loadable classifier checkpoint ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]})") from None
    return model.eval()
