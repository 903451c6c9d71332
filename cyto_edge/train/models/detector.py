"""SSD detectors (LD-WSCCD section D.1) as registered builders.

Contract:
    forward(x)  x: float32 (N, 3, H, W), normalized RGB (manifest mean/std)
                -> loc (N, P, 4) SSD offsets, logits (N, P, C+1) with column 0 = background
    features(x) -> list of (N, C_l, H_l, W_l) maps, finest first (the levels local distillation matches)
    priors      float32 (P, 4) normalized (cx, cy, w, h), the same array the bundle carries
    variances   (0.1, 0.1, 0.2, 0.2)
Raw outputs only: decoding, thresholds and NMS live once, in cyto_edge/runtime/decode.py.

Registered models (GFLOPs at their default input, measured by `model_info`, see README):
    tiny                    320², 4 levels (strides 8-64), depthwise CNN; tests and the quick demo
    ssdlite320_mobilenetv3  320², 5 levels (strides 8-128), MobileNetV3-Large + SSDLite head; the student
    ssdlite512_mobilenetv3  512², 6 levels (strides 8-256)
    ssd320_resnet18         320², 5 levels (strides 8-128), ResNet-18 + SSD 3x3 head; the CPU-trainable teacher
    ssd320_resnet34         320², the same on ResNet-34
    ssd300_vgg16            300², 6 levels, VGG16 (SSD paper); GPU teacher
    ssd512_vgg16            512², 7 levels, VGG16 (the paper's teacher); GPU teacher
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.ssd import SSDHead
from torchvision.models.detection.ssdlite import SSDLiteHead

from cyto_edge.registry import Registry
from cyto_edge.runtime.priors import VARIANCES, PriorSpec, make_priors
from cyto_edge.train.models import backbones as bb

MODELS: Registry[Callable[..., "SSDDetector"]] = Registry("model")


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model from a checkpoint."""

    name: str
    num_classes: int                       # foreground classes C
    input_size: int
    kwargs: dict = field(default_factory=dict)


#: Initial probability of "background" at every prior (None: torchvision's zero bias, 1/(C+1) each).
BACKGROUND_PRIOR: float | None = 0.99


def init_background_prior(module_list: nn.ModuleList, num_logits: int, p: float) -> None:
    """Bias the last convolution of each classification branch so that every prior starts out predicting
    background with probability p (the prior-probability initialisation of RetinaNet, Lin et al. 2017,
    for a softmax over C+1 logits). Nearly every prior is background, so a head that starts uniform spends
    its first hundreds of steps learning just that; with this bias it starts there."""
    b = math.log(p * (num_logits - 1) / (1.0 - p))
    for m in module_list:
        conv = [c for c in m.modules() if isinstance(c, nn.Conv2d)][-1]
        with torch.no_grad():
            conv.bias.view(-1, num_logits)[:, 0] = b


class SSDDetector(nn.Module):
    def __init__(self, spec: ModelSpec, backbone: nn.Module, head: str, s_min: float, s_max: float,
                 aspect_ratios: list[list[float]] | None = None, scales: list[float] | None = None,
                 background_prior: float | None = BACKGROUND_PRIOR):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        S = spec.input_size
        with torch.no_grad():
            was = backbone.training
            backbone.eval()
            sizes = [tuple(f.shape[-2:]) for f in backbone(torch.zeros(1, 3, S, S))]
            backbone.train(was)
        m = len(sizes)
        ratios = aspect_ratios or ([[2.0]] + [[2.0, 3.0]] * (m - 2) + [[2.0]] if m > 2 else [[2.0]] * m)
        self.prior_spec = PriorSpec(input_size=(S, S), feature_sizes=sizes, aspect_ratios=ratios,
                                    s_min=s_min, s_max=s_max, scales=scales)
        anchors = self.prior_spec.anchors_per_level()
        K = spec.num_classes + 1
        chans = list(backbone.out_channels)
        if head == "ssd":
            self.head = SSDHead(chans, anchors, K)
        elif head == "ssdlite":
            from functools import partial
            self.head = SSDLiteHead(chans, anchors, K, partial(nn.BatchNorm2d, eps=0.001, momentum=0.03))
        else:
            raise ValueError(f"unknown head {head!r}")
        if background_prior:
            init_background_prior(self.head.classification_head.module_list, K, background_prior)
        pri = make_priors(self.prior_spec)
        self.register_buffer("priors", torch.from_numpy(pri), persistent=False)
        self.variances = VARIANCES

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def priors_numpy(self) -> np.ndarray:
        return self.priors.detach().cpu().numpy().astype(np.float32)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(x)

    def predict(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(feats)
        return out["bbox_regression"], out["cls_logits"]  # (N, P, 4), (N, P, C+1)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.features(x)
        loc, logits = self.predict(feats)
        return (loc, logits, feats) if return_features else (loc, logits)


def _register(name: str):
    return MODELS.register(name)


@_register("tiny")
def tiny(*, num_classes: int, input_size: int = 320, width: int = 16, num_levels: int = 4,
         s_min: float = 0.05, s_max: float = 0.55, **kw) -> SSDDetector:
    spec = ModelSpec("tiny", num_classes, input_size, dict(width=width, num_levels=num_levels, s_min=s_min, s_max=s_max, **kw))
    return SSDDetector(spec, bb.TinyExtractor(width, num_levels), "ssdlite", s_min, s_max, **kw)


def _ssdlite(name, num_classes, input_size, width_mult, num_levels, s_min, s_max, kw):
    spec = ModelSpec(name, num_classes, input_size,
                     dict(width_mult=width_mult, num_levels=num_levels, s_min=s_min, s_max=s_max, **kw))
    return SSDDetector(spec, bb.MobileNetV3Extractor(width_mult, num_levels), "ssdlite", s_min, s_max, **kw)


@_register("ssdlite320_mobilenetv3")
def ssdlite320_mobilenetv3(*, num_classes: int, input_size: int = 320, width_mult: float = 1.0, num_levels: int = 5,
                           s_min: float = 0.05, s_max: float = 0.55, **kw) -> SSDDetector:
    return _ssdlite("ssdlite320_mobilenetv3", num_classes, input_size, width_mult, num_levels, s_min, s_max, kw)


@_register("ssdlite512_mobilenetv3")
def ssdlite512_mobilenetv3(*, num_classes: int, input_size: int = 512, width_mult: float = 1.0, num_levels: int = 6,
                           s_min: float = 0.03, s_max: float = 0.4, **kw) -> SSDDetector:
    return _ssdlite("ssdlite512_mobilenetv3", num_classes, input_size, width_mult, num_levels, s_min, s_max, kw)


def _resnet(name, depth, num_classes, input_size, num_levels, s_min, s_max, kw):
    spec = ModelSpec(name, num_classes, input_size, dict(num_levels=num_levels, s_min=s_min, s_max=s_max, **kw))
    return SSDDetector(spec, bb.ResNetExtractor(depth, num_levels), "ssd", s_min, s_max, **kw)


@_register("ssd320_resnet18")
def ssd320_resnet18(*, num_classes: int, input_size: int = 320, num_levels: int = 5,
                    s_min: float = 0.05, s_max: float = 0.55, **kw) -> SSDDetector:
    return _resnet("ssd320_resnet18", 18, num_classes, input_size, num_levels, s_min, s_max, kw)


@_register("ssd320_resnet34")
def ssd320_resnet34(*, num_classes: int, input_size: int = 320, num_levels: int = 5,
                    s_min: float = 0.05, s_max: float = 0.55, **kw) -> SSDDetector:
    return _resnet("ssd320_resnet34", 34, num_classes, input_size, num_levels, s_min, s_max, kw)


@_register("ssd300_vgg16")
def ssd300_vgg16(*, num_classes: int, input_size: int = 300, s_min: float = 0.2, s_max: float = 0.9,
                 **kw) -> SSDDetector:
    spec = ModelSpec("ssd300_vgg16", num_classes, input_size, dict(s_min=s_min, s_max=s_max, **kw))
    return SSDDetector(spec, bb.VGGExtractor(highres=False, input_size=input_size), "ssd", s_min, s_max, **kw)


@_register("ssd512_vgg16")
def ssd512_vgg16(*, num_classes: int, input_size: int = 512, s_min: float = 0.2, s_max: float = 0.9,
                 **kw) -> SSDDetector:
    spec = ModelSpec("ssd512_vgg16", num_classes, input_size, dict(s_min=s_min, s_max=s_max, **kw))
    return SSDDetector(spec, bb.VGGExtractor(highres=True, input_size=input_size), "ssd", s_min, s_max, **kw)


def create_model(name: str, *, num_classes: int, input_size: int | None = None, **kw) -> SSDDetector:
    builder = MODELS.get(name)
    if input_size is not None:
        kw["input_size"] = input_size
    return builder(num_classes=num_classes, **kw)


def rebuild(spec: dict | ModelSpec) -> SSDDetector:
    """A model from the `model` entry of a checkpoint."""
    s = spec if isinstance(spec, ModelSpec) else ModelSpec(**spec)
    return create_model(s.name, num_classes=s.num_classes, input_size=s.input_size, **s.kwargs)


def spec_dict(model: SSDDetector) -> dict:
    return asdict(model.spec)


def model_info(model: nn.Module, input_size: int | None = None) -> dict:
    """Parameters and GFLOPs (multiply-adds x 2 / 1e9, batch 1) of a model."""
    from torch.utils.flop_counter import FlopCounterMode

    S = input_size or model.spec.input_size
    params = sum(p.numel() for p in model.parameters())
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 3, S, S))
    model.train(was)
    return {"params": params, "params_m": round(params / 1e6, 3), "gflops": round(fc.get_total_flops() / 1e9, 3),
            "input_size": S, "num_priors": int(model.priors.shape[0])}
