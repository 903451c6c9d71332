"""The attention cell classifier (papers/multiple-attention-fusion-cell-classification.md).

A ResNet whose stages 2-4 carry an SE block and a SAM block in series on every residual branch, with a
disentangled non-local (DNL) block after the last residual block of stage 5; the feature maps of stages
3-5 are globally average-pooled, concatenated and fed to one fully-connected layer (paper §II, §II-D).
Stage 1 is the stem (the 7x7 convolution); stages 2-5 are the four groups of residual blocks.

Where the paper is terse, the cited sources decide, block by block:
- SE (eq. 1-3) is Hu et al.'s: GAP -> FC(C -> C/r) -> ReLU -> FC(C/r -> C) -> sigmoid -> scale, r = 16,
  placed on the residual branch before the addition (SE-ResNet).
- SAM (eq. 4-6): the channel mean (eq. 4) and a 1x1 convolution (eq. 5) give the map G that scales the
  features (eq. 6). Eq. 5 states no activation; the sigmoid is taken from CBAM's spatial attention, as is
  the order (channel attention, then spatial). `sam_kernel=7, sam_max=True` gives CBAM's module exactly.
- DNL follows Yin et al. 2020: whitened (mean-subtracted) query and key give the pairwise softmax term,
  an independent 1x1 convolution and softmax over positions gives the unary term; their sum weights a
  1x1-convolution value embedding; the result goes through 1x1 conv + BN (zero-initialised, so the block
  starts as the identity) and is added to the input. Temperature 0.05 and the 1/sqrt(C') scale as in the
  reference implementation.

Tensors: images (B, 3, H, W) float32 normalised; logits (B, K). Builders are registered by name:
`create_classifier("resnet50" | "resnet18" | "small", num_classes=K, se=, sam=, dnl=)`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cyto_edge.registry import Registry

ARCHS: Registry = Registry("classifier architecture")


class SE(nn.Module):
    """Squeeze-and-excitation (Hu et al.): (B, C, H, W) -> same shape, channels rescaled by S in (0, 1)."""

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 4):
        super().__init__()
        hidden = max(channels // reduction, min_hidden)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z = u.mean(dim=(2, 3))                                   # (B, C)   eq. 1
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(z))))         # (B, C)   eq. 2
        return u * s[:, :, None, None]                           # eq. 3


class SAM(nn.Module):
    """Spatial attention: channel mean (eq. 4) [+ channel max, CBAM] -> conv (eq. 5) -> sigmoid -> scale (eq. 6)."""

    def __init__(self, kernel_size: int = 1, use_max: bool = False):
        super().__init__()
        self.use_max = use_max
        self.conv = nn.Conv2d(2 if use_max else 1, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x = u.mean(dim=1, keepdim=True)                          # (B, 1, H, W)   eq. 4
        if self.use_max:
            x = torch.cat([x, u.amax(dim=1, keepdim=True)], 1)   # (B, 2, H, W)
        g = torch.sigmoid(self.conv(x))                          # (B, 1, H, W)   eq. 5 (+ sigmoid)
        return u * g                                             # eq. 6


class DNL(nn.Module):
    """Disentangled non-local block (Yin et al. 2020): (B, C, H, W) -> same shape, residual."""

    def __init__(self, channels: int, reduction: int = 2, temperature: float = 0.05):
        super().__init__()
        inter = max(channels // reduction, 1)
        self.inter, self.temperature = inter, temperature
        self.query = nn.Conv2d(channels, inter, 1)
        self.key = nn.Conv2d(channels, inter, 1)
        self.value = nn.Conv2d(channels, inter, 1)
        self.unary = nn.Conv2d(channels, 1, 1)
        self.out = nn.Sequential(nn.Conv2d(inter, channels, 1, bias=False), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.out[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2)                             # (B, C', HW)
        k = self.key(x).flatten(2)                               # (B, C', HW)
        v = self.value(x).flatten(2).transpose(1, 2)             # (B, HW, C')
        q = q - q.mean(dim=2, keepdim=True)                      # whitening: remove the mean over positions
        k = k - k.mean(dim=2, keepdim=True)
        sim = torch.bmm(q.transpose(1, 2), k) / (math.sqrt(self.inter) * self.temperature)
        pair = sim.softmax(dim=-1)                               # (B, HW, HW)  pairwise term
        unary = self.unary(x).flatten(2).softmax(dim=-1)         # (B, 1, HW)   unary term, expanded over queries
        y = torch.bmm(pair + unary, v)                           # (B, HW, C')
        y = y.transpose(1, 2).reshape(b, self.inter, h, w)
        return x + self.out(y)


def _attention(channels: int, se: bool, sam: bool, sam_kernel: int, sam_max: bool) -> nn.Module:
    mods = ([SE(channels)] if se else []) + ([SAM(sam_kernel, sam_max)] if sam else [])
    return nn.Sequential(*mods) if mods else nn.Identity()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, attn: nn.Module):
        super().__init__()
        cout = width * self.expansion
        self.branch = nn.Sequential(
            nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.attn = attn
        self.short = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.attn(self.branch(x)) + self.short(x))


class Bottleneck(BasicBlock):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, attn: nn.Module):
        nn.Module.__init__(self)
        cout = width * self.expansion
        self.branch = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.attn = attn
        self.short = _shortcut(cin, cout, stride)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class AttentionResNet(nn.Module):
    """ResNet with SE+SAM in stages 2-4, DNL at the end of stage 5, GAP of stages 3-5 concatenated, FC.

    `stem="imagenet"`: 7x7/2 conv + 3x3/2 max-pool (overall stride 32, the paper's ResNet-50);
    `stem="small"`: 3x3/2 conv (overall stride 16, for small crops on the edge).
    """

    def __init__(self, block: type[BasicBlock], layers: tuple[int, ...], widths: tuple[int, ...], *,
                 num_classes: int, se: bool = True, sam: bool = True, dnl: bool = True,
                 stem: str = "imagenet", sam_kernel: int = 1, sam_max: bool = False, dropout: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.config = dict(se=se, sam=sam, dnl=dnl)
        w0 = widths[0]
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(3, w0, 7, 2, 3, bias=False), nn.BatchNorm2d(w0),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        elif stem == "small":
            self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0),
                                      nn.ReLU(inplace=True))
        else:
            raise ValueError(f"stem must be imagenet or small, got {stem!r}")
        cin, stages = w0, []
        for i, (n, w) in enumerate(zip(layers, widths)):
            with_attn = i < 3                                      # stages 2-4 carry SE + SAM
            blocks = []
            for j in range(n):
                attn = _attention(w * block.expansion, se and with_attn, sam and with_attn, sam_kernel, sam_max)
                blocks.append(block(cin, w, 2 if (j == 0 and i > 0) else 1, attn))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)                        # stages 2, 3, 4, 5
        self.dnl = DNL(cin) if dnl else nn.Identity()
        self.stage_channels = [w * block.expansion for w in widths]  # channels of stages 2-5
        self.feature_dim = sum(self.stage_channels[1:])            # GAP of stages 3-5, concatenated
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.feature_dim, num_classes)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, BasicBlock):                          # zero-init the last BN of each branch
                nn.init.zeros_(m.branch[-1].weight)

    def stage_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of stages 2-5: [(B, C2, H/4, W/4), ..., (B, C5, H/32, W/32)] (imagenet stem)."""
        x = self.stem(x)
        maps = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == len(self.stages) - 1:
                x = self.dnl(x)                                    # DNL after the last residual block
            maps.append(x)
        return maps

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, feature_dim): GAP of stages 3-5, concatenated."""
        maps = self.stage_maps(x)
        return torch.cat([m.mean(dim=(2, 3)) for m in maps[1:]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.embed(x)))                   # (B, K) logits


@ARCHS.register("resnet50")
def resnet50(*, num_classes: int, se: bool = True, sam: bool = True, dnl: bool = True, width: int = 64,
             **kw) -> AttentionResNet:
    """The paper's ResNet-50 (bottleneck blocks 3-4-6-3; 23.5 M parameters without attention, 32.9 M with)."""
    return AttentionResNet(Bottleneck, (3, 4, 6, 3), (width, 2 * width, 4 * width, 8 * width),
                           num_classes=num_classes, se=se, sam=sam, dnl=dnl, stem="imagenet", **kw)


@ARCHS.register("resnet18")
def resnet18(*, num_classes: int, se: bool = True, sam: bool = True, dnl: bool = True, width: int = 64,
             **kw) -> AttentionResNet:
    """ResNet-18 layout (basic blocks 2-2-2-2): the edge variant at full width."""
    return AttentionResNet(BasicBlock, (2, 2, 2, 2), (width, 2 * width, 4 * width, 8 * width),
                           num_classes=num_classes, se=se, sam=sam, dnl=dnl, stem="imagenet", **kw)


@ARCHS.register("small")
def small(*, num_classes: int, se: bool = True, sam: bool = True, dnl: bool = True, width: int = 16,
          **kw) -> AttentionResNet:
    """Reduced ResNet (one basic block per stage, width 16-128, stride-16 stem): for small crops on CPU."""
    kw.setdefault("stem", "small")
    return AttentionResNet(BasicBlock, (1, 1, 1, 1), (width, 2 * width, 4 * width, 8 * width),
                           num_classes=num_classes, se=se, sam=sam, dnl=dnl, **kw)


def create_classifier(name: str, **kw) -> AttentionResNet:
    """Build a registered architecture by name (BadInput naming the choices for an unknown name)."""
    return ARCHS.get(name)(**kw)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
