"""Training-side evaluation: full images, tiled exactly as the runtime does (runtime/tiling.py), decoded by
the one decoder, scored by the torch-free metrics (runtime/metrics.py)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from cyto_edge.errors import BadInput
from cyto_edge.runtime.decode import Detections, PostProcess
from cyto_edge.runtime.metrics import DetectionMetrics, evaluate_detections
from cyto_edge.runtime.tiling import detect_frame
from cyto_edge.train.data.types import DetectionDataset


def torch_infer(model: torch.nn.Module, device: torch.device):
    """numpy (T, 3, H, W) -> numpy (loc, logits[, mil]), the same contract as a runtime Engine (a detector
    with a MIL head, train/models/mil_head.MilDetector, returns the third output that detect_frame re-scores by)."""

    @torch.no_grad()
    def infer(x: np.ndarray):
        return tuple(o.float().cpu().numpy() for o in model(torch.from_numpy(x).to(device)))

    return infer


def read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise BadInput(f"{path}: cannot read image (missing or corrupt); run `cyto-edge data check` on the dataset")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def detect_dataset(model, ds: DetectionDataset, *, model_um_per_px: float | None, overlap: int,
                   cfg: PostProcess, mean, std, batch_size: int = 8, device=None, progress=None,
                   max_images: int | None = None) -> list[Detections]:
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    factor = (ds.um_per_px / model_um_per_px) if (ds.um_per_px and model_um_per_px) else 1.0
    infer = torch_infer(model, device)
    pri = model.priors_numpy()
    S = model.spec.input_size
    out = []
    images = ds.images[:max_images] if max_images else ds.images
    for rec in images:
        out.append(detect_frame(infer, read_rgb(rec.file), input_size=S, priors=pri, variances=model.variances,
                                cfg=cfg, mean=mean, std=std, overlap=overlap, factor=factor, batch_size=batch_size,
                                rescore_weight=getattr(model, "rescore_weight", None)))
        if progress is not None:
            progress()
    model.train(was)
    return out


def evaluate_model(model, ds: DetectionDataset, *, model_um_per_px: float | None, overlap: int, mean, std,
                   score_threshold: float = 0.05, nms_iou: float = 0.45, max_detections: int = 300,
                   batch_size: int = 8, max_images: int | None = None, progress=None,
                   operating_threshold: float = 0.5) -> tuple[DetectionMetrics, list[Detections]]:
    cfg = PostProcess(score_threshold=score_threshold, nms_iou=nms_iou, max_detections=max_detections)
    dets = detect_dataset(model, ds, model_um_per_px=model_um_per_px, overlap=overlap, cfg=cfg, mean=mean, std=std,
                          batch_size=batch_size, progress=progress, max_images=max_images)
    images = ds.images[: len(dets)]
    metrics = evaluate_detections(images, dets, ds.classes, score_threshold=operating_threshold)
    return metrics, dets
