"""Integrated gradients for any scalar score of an image, the completeness check, and the heat-map overlay.

Spec: interpretable-channel-attention-multicell.md, section II-C, which adopts integrated gradients and
cites Sundararajan, Taly & Yan, "Axiomatic attribution for deep networks" (ICML 2017) for it; the
equations are taken from that source:

- eq. 1:  IG_i(x) = (x_i - x'_i) * integral_0^1 dF(x' + a (x - x')) / dx_i da
- eq. 3 (Riemann approximation):  IG_i(x) ~= (x_i - x'_i) * sum_{k=1..m} dF(x' + k/m (x - x')) / dx_i * 1/m
- completeness (Proposition 1):  sum_i IG_i(x) = F(x) - F(x')

`method` chooses the quadrature: "riemann" is eq. 3 (right sum, m gradient evaluations), "trapezoid"
uses the m + 1 points k/m, k = 0..m, with half weights at the ends (the same cost plus one, usually a
smaller completeness error), "midpoint" the points (k - 1/2)/m. The completeness check is always
reported: sum of attributions, F(x) - F(x'), and the relative error |sum - delta| / |delta|; Sundararajan
et al. suggest increasing the steps until it is within 5%.

Inputs here are RGB images as float32 (3, H, W) in [0, 1]; the score function takes a batch
(B, 3, H, W) in that space and applies its own normalisation, so attributions are per pixel and
channel of the image as stored, in units of the score.

Baselines x' (Sturmfels et al., "Visualizing the impact of feature attribution baselines", 2020):
`black` (all zeros), `blur` (the image under a Gaussian blur of sigma = max(H, W) / 16 px, at least
4 px: removes nuclear and chromatin detail, keeps the layout and colour), `noise` (uniform in [0, 1]
per pixel, seeded).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from cyto_edge.errors import BadInput

BASELINES = ("black", "blur", "noise")
METHODS = ("riemann", "trapezoid", "midpoint")

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) float in [0, 1] -> (B,) scores


@dataclass
class IGResult:
    attributions: np.ndarray  # (3, H, W) float32, in score units
    score: float              # F(x)
    baseline_score: float     # F(x')
    steps: int
    method: str
    baseline: str = "custom"

    @property
    def total(self) -> float:
        return float(self.attributions.astype(np.float64).sum())

    @property
    def delta(self) -> float:
        return self.score - self.baseline_score

    @property
    def relative_error(self) -> float:
        """|sum - delta| / |delta|; the denominator is floored at 1e-6 (a flat score has no scale)."""
        return abs(self.total - self.delta) / max(abs(self.delta), 1e-6)

    def completeness(self) -> dict:
        d = {"sum_attributions": self.total, "score": self.score, "baseline_score": self.baseline_score,
             "score_difference": self.delta, "abs_error": abs(self.total - self.delta),
             "relative_error": self.relative_error, "steps": self.steps, "method": self.method,
             "baseline": self.baseline}
        if abs(self.delta) < 1e-6:
            d["note"] = "the score barely differs from the baseline's: try another --baseline"
        return d


def path_points(steps: int, method: str = "trapezoid") -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of the quadrature of the path integral over a in [0, 1]; weights sum to 1."""
    if steps < 1:
        raise BadInput(f"--steps must be >= 1, got {steps}")
    m = steps
    if method == "riemann":
        return np.arange(1, m + 1) / m, np.full(m, 1.0 / m)
    if method == "midpoint":
        return (np.arange(1, m + 1) - 0.5) / m, np.full(m, 1.0 / m)
    if method == "trapezoid":
        w = np.full(m + 1, 1.0 / m)
        w[0] = w[-1] = 0.5 / m
        return np.arange(0, m + 1) / m, w
    raise BadInput(f"unknown integration method {method!r}; choose one of: {', '.join(METHODS)}")


def make_baseline(image: np.ndarray, kind: str = "black", seed: int = 0, blur_sigma: float | None = None) -> np.ndarray:
    """A baseline x' for an RGB float image (3, H, W) in [0, 1]."""
    _, H, W = image.shape
    if kind == "black":
        return np.zeros_like(image)
    if kind == "blur":
        sigma = blur_sigma or max(4.0, max(H, W) / 16)
        hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
        return cv2.GaussianBlur(hwc, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT).transpose(2, 0, 1).copy()
    if kind == "noise":
        return np.random.default_rng(seed).uniform(0, 1, image.shape).astype(image.dtype)
    raise BadInput(f"unknown baseline {kind!r}; choose one of: {', '.join(BASELINES)}")


def integrated_gradients(score_fn: ScoreFn, image: np.ndarray | torch.Tensor, baseline: np.ndarray | torch.Tensor,
                         steps: int = 50, method: str = "trapezoid", batch_size: int = 16,
                         baseline_name: str = "custom") -> IGResult:
    """IG of `score_fn` at `image` (3, H, W) against `baseline` (3, H, W) (eq. 1, by quadrature)."""
    x = torch.as_tensor(image, dtype=torch.float32)
    x0 = torch.as_tensor(baseline, dtype=torch.float32)
    if x.shape != x0.shape:
        raise ValueError(f"baseline shape {tuple(x0.shape)} != image shape {tuple(x.shape)}")
    alphas, weights = path_points(steps, method)
    diff = x - x0
    grad_sum = torch.zeros_like(x, dtype=torch.float64)
    for i in range(0, len(alphas), batch_size):
        a = torch.as_tensor(alphas[i:i + batch_size], dtype=torch.float32).view(-1, 1, 1, 1)
        w = torch.as_tensor(weights[i:i + batch_size], dtype=torch.float64).view(-1, 1, 1, 1)
        pts = (x0.unsqueeze(0) + a * diff.unsqueeze(0)).requires_grad_(True)  # (b, 3, H, W)
        scores = score_fn(pts)                                                 # (b,)
        (grads,) = torch.autograd.grad(scores.sum(), pts)
        grad_sum += (grads.double() * w).sum(0)
    attr = (diff.double() * grad_sum).float().numpy()
    with torch.no_grad():
        ends = score_fn(torch.stack([x, x0])).double()
    return IGResult(attr, float(ends[0]), float(ends[1]), steps, method, baseline_name)


# ----------------------------------------------------------------------------------- images and overlay

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB; an unreadable file is BadInput naming it."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{p}: no such image file")
    img = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if img is None:
        raise BadInput(f"{p}: cannot read the image (not a PNG/JPEG/BMP/TIFF, or damaged)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_rgb(data: bytes, name: str = "upload") -> np.ndarray:
    """Encoded image bytes (PNG/JPEG/...) -> (H, W, 3) uint8 RGB."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise BadInput(f"{name}: cannot decode the image (send a PNG or JPEG)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def to_chw(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0


def attribution_map(attr: np.ndarray, sign: str = "abs") -> np.ndarray:
    """(3, H, W) attributions -> (H, W) float32 in [0, 1] (summed over channels, clipped at the 99.5th
    percentile). `sign`: abs (magnitude), positive (evidence for the score), negative (against it)."""
    a = attr.sum(0)
    a = {"abs": np.abs(a), "positive": np.maximum(a, 0), "negative": np.maximum(-a, 0)}[sign]
    hi = float(np.percentile(a, 99.5)) if a.size else 0.0
    if hi <= 0:
        hi = float(a.max()) if a.size and a.max() > 0 else 1.0
    return np.clip(a / hi, 0, 1).astype(np.float32)


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.7,
            box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Blend a JET heat map (H, W) in [0, 1] over an RGB image (H, W, 3) uint8 -> (H, W, 3) uint8 RGB.
    The blend weight follows the heat, so unattributed pixels keep the image; `box` is xyxy pixels."""
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"heat map {heat.shape} does not match image {rgb.shape[:2]}")
    color = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    w = (alpha * np.sqrt(heat))[..., None]  # sqrt: faint attributions stay visible
    out = (rgb.astype(np.float32) * (1 - w) + color.astype(np.float32) * w).round().clip(0, 255).astype(np.uint8)
    if box is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), (255, 255, 255), 1)
    return out


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB image as PNG atomically (temp file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise BadInput(f"{p}: cannot encode the overlay as PNG")
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(buf.tobytes())
    tmp.replace(p)
    return p


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("cannot encode PNG")
    return buf.tobytes()
