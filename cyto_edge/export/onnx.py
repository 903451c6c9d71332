"""FP32 ONNX export of a detector: normalized NCHW batch in (dynamic batch), raw head outputs out.

    images  float32 (N, 3, H, W)   normalized as the manifest's InputSpec says
    loc     float32 (N, P, 4)      SSD offsets
    logits  float32 (N, P, C+1)    column 0 background
    mil     float32 (N, P, C+1)    only for a detector with a MIL head (train/models/mil_head.MilDetector):
                                   per-prior refined MIL class distribution, applied by runtime/rescore.py
Priors, variances and preprocessing travel in the bundle, not in the graph (one decoder, in the runtime).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

INPUT_NAME = "images"
OUTPUT_NAMES = ("loc", "logits")
MIL_OUTPUT = "mil"
DEFAULT_OPSET = 18


def output_names(model: nn.Module) -> list[str]:
    """loc, logits, and mil for a detector that carries a MIL head."""
    return [*OUTPUT_NAMES, *([MIL_OUTPUT] if hasattr(model, "rescore_weight") else [])]


class ExportWrapper(nn.Module):
    """An explicit export module: the detector's forward with its two (or, with a MIL head, three) outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return tuple(self.model(images))


def export_onnx(model: nn.Module, path: str | Path, opset: int = DEFAULT_OPSET, simplify: bool = True) -> Path:
    """Write `model` to `path` as ONNX with a dynamic batch dimension; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    S = model.spec.input_size
    wrapper = ExportWrapper(model.eval().cpu())
    names = output_names(model)
    x = torch.zeros(1, 3, S, S)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(wrapper, (x,), str(path), input_names=[INPUT_NAME], output_names=names,
                              dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=256)}},
                              opset_version=opset, dynamo=True, external_data=False, verbose=False)
        except Exception:  # noqa: BLE001 - fall back to the TorchScript exporter for graphs dynamo rejects
            torch.onnx.export(wrapper, (x,), str(path), input_names=[INPUT_NAME], output_names=names,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}},
                              opset_version=min(opset, 17), dynamo=False)
    if simplify:
        simplify_onnx(path)
    return path


def simplify_onnx(path: Path) -> bool:
    """Constant folding and graph clean-up with onnxslim (in place); False when onnxslim is absent."""
    try:
        import onnx
        import onnxslim
    except ImportError:
        return False
    model = onnxslim.slim(onnx.load(str(path)))
    onnx.save(model, str(path))
    return True


def onnx_opset(path: str | Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
