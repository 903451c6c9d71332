"""Quantization-aware fine-tuning (`export --qat-epochs N`), for when post-training quantization loses too much.

The detector is fine-tuned for a few epochs with the int8 arithmetic of the QDQ file simulated in the
forward pass, so that its weights settle where rounding costs little:
  1. batch norms are folded into their convolutions (eval statistics, frozen), as the ONNX graph has them;
  2. every Conv2d becomes a FakeQuantConv: weights fake-quantized per output channel, symmetric int8
     in the 7-bit range [-64, 64], scale max|w| / 64 (exactly the weight quantizer of export/quantize.py), inputs
     fake-quantized per tensor, symmetric int8, scale from a moving average of max|x| (observers frozen
     for the last epoch); gradients pass straight through the rounding (torch.fake_quantize_*);
  3. training crops of the train split, the SSD MultiBox loss, AdamW at a tenth of the recipe's rate;
  4. the fine-tuned float model is exported to ONNX, and quantized by export/quantize.py with the
     learned input ranges pinned (TensorQuantOverrides on each Conv's input tensor, found through its
     weight initializer `model.<module>.weight`); the other tensors are calibrated as in PTQ.
The result is one QDQ file like PTQ's, and goes through the same acceptance gate.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

QMAX = 127   # inputs: int8 symmetric
WMAX = 64    # weights: ONNX Runtime's reduced (7-bit) symmetric range, as export/quantize.py writes them


class FakeQuantConv(nn.Module):
    """A Conv2d computing with int8-rounded weights (per channel) and inputs (per tensor), symmetric."""

    def __init__(self, conv: nn.Conv2d, momentum: float = 0.05):
        super().__init__()
        self.conv = conv
        self.momentum = momentum
        self.observe = True
        self.register_buffer("absmax", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.observe:
            m = x.detach().abs().amax()
            self.absmax.copy_(m if self.absmax == 0 else (1 - self.momentum) * self.absmax + self.momentum * m)
        s_x = (self.absmax / QMAX).clamp(min=1e-8).reshape(1)
        x = torch.fake_quantize_per_tensor_affine(x, s_x, torch.zeros(1, dtype=torch.int32), -QMAX, QMAX)
        w = self.conv.weight
        s_w = (w.detach().abs().amax(dim=(1, 2, 3)) / WMAX).clamp(min=1e-8)
        w = torch.fake_quantize_per_channel_affine(w, s_w, torch.zeros_like(s_w, dtype=torch.int32), 0, -WMAX, WMAX)
        c = self.conv
        return F.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)


def fold_batchnorms(module: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d in a Sequential into the conv; returns how many."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    n = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[a] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                seq._modules[b] = nn.Identity()
                n += 1
    return n


def wrap_convs(module: nn.Module, prefix: str = "") -> dict[str, FakeQuantConv]:
    """Replace every Conv2d by a FakeQuantConv in place; returns {conv module name: wrapper}."""
    out = {}
    for name, child in list(module.named_children()):
        full = f"{prefix}{name}"
        if isinstance(child, nn.Conv2d):
            module._modules[name] = out[full] = FakeQuantConv(child)
        else:
            out.update(wrap_convs(child, full + "."))
    return out


def unwrap_convs(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, FakeQuantConv):
            module._modules[name] = child.conv
        else:
            unwrap_convs(child)


def qat_finetune(model: nn.Module, train_ds, *, epochs: int, steps_per_epoch: int, batch_size: int, lr: float,
                 um_per_px: float | None, seed: int = 0, progress=None) -> tuple[nn.Module, dict[str, float]]:
    """Fine-tune `model` (modified in place) with simulated int8; returns (float model, {conv name: max|input|})."""
    from cyto_edge.train.data.torch_data import AugConfig, CropDataset, collate
    from cyto_edge.train.losses.multibox import MultiBoxLoss

    torch.manual_seed(seed)
    model.eval()
    fold_batchnorms(model)
    fq = wrap_convs(model)
    crops = CropDataset(train_ds, model.spec.input_size, um_per_px, steps_per_epoch * batch_size, seed=seed,
                        aug=AugConfig())
    loader = torch.utils.data.DataLoader(crops, batch_size=batch_size, shuffle=False, collate_fn=collate)
    loss_fn = MultiBoxLoss(model.priors, model.variances)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    total = epochs * steps_per_epoch
    step = 0
    model.train()   # batch norms are folded: train mode only switches the observers on
    for epoch in range(epochs):
        crops.set_epoch(epoch)
        for m in fq.values():
            m.observe = epoch < max(1, epochs - 1)
        for batch in loader:
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
            loc, logits = model(batch["image"])[:2]
            loss = loss_fn(loc, logits, batch["boxes"], batch["labels"], batch["valid"], batch["boxed"],
                           batch["ignore"])["multibox"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            step += 1
            if progress is not None:
                progress(float(loss.detach()))
    ranges = {name: float(m.absmax) for name, m in fq.items()}
    unwrap_convs(model)
    return model.eval(), ranges


def input_overrides(onnx_path, ranges: dict[str, float], prefix: str = "model.") -> dict[str, tuple[float, float]]:
    """{Conv input tensor name: (-a, a)} from the QAT ranges, matched through each Conv's weight initializer."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    out: dict[str, tuple[float, float]] = {}
    for n in g.node:
        if n.op_type != "Conv" or len(n.input) < 2:
            continue
        w = n.input[1]
        name = w[len(prefix):] if w.startswith(prefix) else w
        name = name.removesuffix(".weight")
        if name in ranges and ranges[name] > 0:
            a = max(ranges[name], out.get(n.input[0], (0.0, 0.0))[1])
            out[n.input[0]] = (-a, a)
    return out
