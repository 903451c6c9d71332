"""Feature extractors for SSD: each returns a list of feature maps, finest first.

torchvision provides the parts (VGG16 and its SSD extras, MobileNetV3, ResNet); the taps and the extra
layers are chosen here so that the finest level has stride 8: cytology's smallest objects (trichomonas,
~15 px at 1 µm/px) need priors on a stride-8 map.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18, resnet34, vgg16
from torchvision.models.detection.ssd import _vgg_extractor
from torchvision.models.detection.ssdlite import _extra_block, _normal_init
from torchvision.ops.misc import Conv2dNormActivation


class VGGExtractor(nn.Module):
    """SSD300 / SSD512 VGG16 extractor of the SSD paper (torchvision): 6 levels at 300, 7 at 512.

    At inputs too small for the last unpadded extra layers (tests run every model at 128 px) the levels
    that cannot be computed are dropped; the count is fixed at construction, so export traces stay static.
    """

    def __init__(self, highres: bool, input_size: int = 300):
        super().__init__()
        self.body = _vgg_extractor(vgg16(weights=None), highres, trainable_layers=5)
        channels = [512, 1024, 512, 256, 256, 256] + ([256] if highres else [])
        self.num_extra = len(self.body.extra)
        with torch.no_grad():
            x = self.body.features(torch.zeros(1, 3, input_size, input_size))
            for i, block in enumerate(self.body.extra):
                try:
                    x = block(x)
                except RuntimeError:
                    self.num_extra = i
                    break
        self.body.extra = nn.ModuleList(list(self.body.extra)[: self.num_extra])
        self.out_channels = channels[: 1 + self.num_extra]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = self.body
        x = b.features(x)
        out = [b.scale_weight.view(1, -1, 1, 1) * torch.nn.functional.normalize(x)]
        for block in b.extra:
            x = block(x)
            out.append(x)
        return out


class MobileNetV3Extractor(nn.Module):
    """MobileNetV3-Large taps at strides 8 (40 ch·w), 16 (C4 expansion, as SSDLite), 32, then
    depthwise extra blocks (torchvision's `_extra_block`) down to `num_levels` levels."""

    def __init__(self, width_mult: float = 1.0, num_levels: int = 5, extra_channels=(512, 256, 256, 128)):
        super().__init__()
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
        feats = mobilenet_v3_large(weights=None, width_mult=width_mult, norm_layer=norm).features
        c4 = [i for i, b in enumerate(feats) if getattr(b, "_is_cn", False)][-1]   # block that goes to stride 32
        c3 = [i for i, b in enumerate(feats) if getattr(b, "_is_cn", False)][-2]   # block that goes to stride 16
        self.stages = nn.ModuleList([
            nn.Sequential(*feats[:c3]),                                   # stride 8
            nn.Sequential(*feats[c3:c4], feats[c4].block[0]),             # stride 16, C4 expansion
            nn.Sequential(feats[c4].block[1:], *feats[c4 + 1:]),          # stride 32
        ])
        chans = [feats[c3 - 1].out_channels, feats[c4].block[0].out_channels, feats[-1].out_channels]
        depth = [max(16, int(c * width_mult)) for c in extra_channels]
        extra, cin = [], chans[-1]
        for d in depth[: max(0, num_levels - 3)]:
            extra.append(_extra_block(cin, d, norm))
            cin = d
        self.extra = nn.ModuleList(extra)
        _normal_init(self.extra)
        self.out_channels = (chans + depth)[:num_levels]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        for e in self.extra:
            x = e(x)
            out.append(x)
        return out[: len(self.out_channels)]


class ResNetExtractor(nn.Module):
    """ResNet-18/34 taps at strides 8, 16, 32 (layer2-4) plus 3x3 stride-2 extra layers."""

    def __init__(self, depth: int = 18, num_levels: int = 5, extra_channels=(256, 256, 128)):
        super().__init__()
        net = {18: resnet18, 34: resnet34}[depth](weights=None)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layers = nn.ModuleList([net.layer2, net.layer3, net.layer4])
        extra, cin = [], 512
        for d in extra_channels[: max(0, num_levels - 3)]:
            extra.append(nn.Sequential(Conv2dNormActivation(cin, d // 2, 1), Conv2dNormActivation(d // 2, d, 3, stride=2)))
            cin = d
        self.extra = nn.ModuleList(extra)
        self.out_channels = ([128, 256, 512] + list(extra_channels))[:num_levels]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        for e in self.extra:
            x = e(x)
            out.append(x)
        return out[: len(self.out_channels)]


def _dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Depthwise-separable block: 3x3 depthwise (stride) + 1x1 pointwise, BN + ReLU6."""
    return nn.Sequential(
        Conv2dNormActivation(cin, cin, 3, stride=stride, groups=cin, activation_layer=nn.ReLU6),
        Conv2dNormActivation(cin, cout, 1, activation_layer=nn.ReLU6),
    )


class TinyExtractor(nn.Module):
    """A small depthwise-separable CNN for tests and the quick demo: levels at strides 8, 16, 32, 64(, 128)."""

    def __init__(self, width: int = 16, num_levels: int = 4):
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            Conv2dNormActivation(3, w, 3, stride=2, activation_layer=nn.ReLU6),      # /2
            _dw(w, 2 * w, 2), _dw(2 * w, 2 * w, 1),                                  # /4
            _dw(2 * w, 3 * w, 2), _dw(3 * w, 3 * w, 1),                              # /8
        )
        chans = [3 * w, 4 * w, 6 * w, 6 * w, 4 * w][:num_levels]
        blocks, cin = [], 3 * w
        for c in chans[1:]:
            blocks.append(nn.Sequential(_dw(cin, c, 2), _dw(c, c, 1)))
            cin = c
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = chans

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = [x]
        for b in self.blocks:
            x = b(x)
            out.append(x)
        return out
