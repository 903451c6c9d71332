"""What `cyto-edge explain` explains: a classifier's class score or one detection's score, loaded from a
checkpoint, turned into a scalar function of the image for integrated gradients (train/explain.py).

Checkpoints recognised (by their "format", not by file name):
- "cyto-edge-classifier": the multi-cell classifiers of models/rcan.py (rcan / rcan-noca / plain);
  images of any size at the checkpoint's µm/px (GAP head), explained as they are;
- "cyto-edge/cell-classifier": the attention cell classifier (`cyto-edge train-classifier`); it takes
  S x S crops resized from the cell crop, so the bilinear resize is part of the explained function and
  the attributions are per pixel of the image given;
- "cyto-edge-ckpt/1": a detector of the detection core (EMA weights when present).

Scores, for a float RGB image in [0, 1] (the checkpoint's mean/std applied inside):
- classifier: softmax probability of the class (`--class`, else the predicted class), or its logit;
- detector: the softmax probability, for class c, of the prior p whose decoded box is the detection
  chosen at the image: the one best matching `--box` (largest IoU among priors scoring >= 0.05), else
  the top-scoring prior. p and c stay fixed along the integration path.
Detectors take a fixed input of S x S px: a smaller image is padded (bottom/right, black), a larger one
is explained in the S x S window centred on `--box` (or on the top detection over the tiles of the
image); attributions outside the window are zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cyto_edge.errors import BadInput
from cyto_edge.runtime.boxes import iou as box_iou
from cyto_edge.runtime.decode import decode_boxes, tile_grid
from cyto_edge.train.explain import (IGResult, attribution_map, integrated_gradients, make_baseline, overlay,
                                     to_chw)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Explanation:
    ig: IGResult
    overlay: np.ndarray                  # (H, W, 3) uint8 RGB, the size of the input image
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**self.info, "completeness": self.ig.completeness()}


def _norm(mean, std):
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return lambda x: (x - m) / s


class Explainer:
    """Loads a checkpoint once; `explain(rgb, ...)` for each image."""

    def __init__(self, ckpt_path: str | Path):
        self.path = Path(ckpt_path)
        if not self.path.is_file():
            raise BadInput(f"{self.path}: no such checkpoint file")
        try:
            ckpt = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling problem means a bad file
            raise BadInput(f"{self.path}: not a readable checkpoint ({type(e).__name__})") from None
        if not isinstance(ckpt, dict):
            raise BadInput(f"{self.path}: not a cyto-edge checkpoint (expected a dict)")
        fmt = ckpt.get("format")
        self.resize_to: tuple[int, int] | None = None
        if fmt == "cyto-edge-classifier":
            self._load_classifier(ckpt)
        elif fmt == "cyto-edge/cell-classifier":
            self._load_cell_classifier()
        elif fmt == "cyto-edge-ckpt/1" or (isinstance(ckpt.get("model"), dict) and "name" in ckpt["model"]):
            self._load_detector(ckpt)
        else:
            raise BadInput(f"{self.path}: format {fmt!r} is neither a classifier nor a detector checkpoint")
        torch.set_grad_enabled(True)

    def _load_classifier(self, ckpt: dict) -> None:
        from cyto_edge.train.models.rcan import load_checkpoint

        self.kind = "classifier"
        self.model = load_checkpoint(ckpt, str(self.path))
        self.classes = list(ckpt["classes"])
        inp = ckpt.get("input", {})
        self.normalize = _norm(inp.get("mean", IMAGENET_MEAN), inp.get("std", IMAGENET_STD))
        self.arch = ckpt.get("arch")

    def _load_cell_classifier(self) -> None:
        from cyto_edge.train.classify import load_checkpoint

        self.kind = "classifier"
        self.model, meta = load_checkpoint(self.path)
        self.classes = list(meta["classes"])
        inp = meta.get("input", {})
        self.normalize = _norm(inp.get("mean", IMAGENET_MEAN), inp.get("std", IMAGENET_STD))
        self.resize_to = tuple(int(v) for v in inp.get("size", ())) or None
        self.arch = meta.get("arch")

    def _load_detector(self, ckpt: dict) -> None:
        from cyto_edge.train.checkpoint import model_from_checkpoint

        self.kind = "detector"
        try:
            self.model = model_from_checkpoint(ckpt)
        except (KeyError, RuntimeError, TypeError) as e:
            raise BadInput(f"{self.path}: detector weights do not fit the model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160]})") from None
        self.classes = list(ckpt.get("classes") or [f"class{i}" for i in range(self.model.num_classes)])
        norm = ckpt.get("normalization") if isinstance(ckpt.get("normalization"), dict) else {}
        self.normalize = _norm(norm.get("mean", IMAGENET_MEAN), norm.get("std", IMAGENET_STD))
        self.size = int(self.model.spec.input_size)
        self.priors = self.model.priors_numpy()
        self.arch = ckpt["model"]["name"]

    def class_index(self, name: str | None) -> int | None:
        if name is None:
            return None
        if name in self.classes:
            return self.classes.index(name)
        raise BadInput(f"--class {name!r} is not a class of {self.path.name}; choose one of: {', '.join(self.classes)}")

    # ------------------------------------------------------------------------------- explain

    def explain(self, rgb: np.ndarray, *, box=None, class_name: str | None = None, baseline: str = "black",
                steps: int = 50, method: str = "trapezoid", score: str = "prob", seed: int = 0,
                batch_size: int = 16) -> Explanation:
        """rgb (H, W, 3) uint8; box xyxy pixels of the image or None."""
        c = self.class_index(class_name)
        opts = dict(baseline=baseline, steps=steps, method=method, seed=seed, batch_size=batch_size)
        if self.kind == "classifier":
            return self._explain_classifier(rgb, c, score, **opts)
        return self._explain_detection(rgb, box, c, **opts)

    def _ig(self, fn, x: np.ndarray, baseline: str, steps: int, method: str, seed: int, batch_size: int) -> IGResult:
        base = make_baseline(x, baseline, seed)
        return integrated_gradients(fn, x, base, steps, method, batch_size, baseline_name=baseline)

    def _classify(self, b: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> logits; the model's own resize (if any) is part of the function."""
        if self.resize_to is not None and tuple(b.shape[-2:]) != self.resize_to:
            b = torch.nn.functional.interpolate(b, size=self.resize_to, mode="bilinear", align_corners=False)
        return self.model(self.normalize(b))

    def _explain_classifier(self, rgb, c, score, **opts) -> Explanation:
        x = to_chw(rgb)
        with torch.no_grad():
            probs = torch.softmax(self._classify(torch.from_numpy(x)[None]), 1)[0]
        c = int(probs.argmax()) if c is None else c

        def fn(b: torch.Tensor) -> torch.Tensor:
            logits = self._classify(b)
            return torch.softmax(logits, 1)[:, c] if score == "prob" else logits[:, c]

        ig = self._ig(fn, x, **opts)
        info = {"kind": "classifier", "arch": self.arch, "class": self.classes[c], "score_kind": score,
                "probabilities": {k: round(float(p), 5) for k, p in zip(self.classes, probs)}}
        return Explanation(ig, overlay(rgb, attribution_map(ig.attributions)), info)

    # ----------------------------------------------------------------------------- detection

    def _prior_table(self, win: np.ndarray):
        """(3, S, S) window -> decoded prior boxes (P, 4) xyxy px, foreground probs (P, C)."""
        with torch.no_grad():
            loc, logits = self.model(self.normalize(torch.from_numpy(win)[None]))
        boxes = decode_boxes(loc[0].numpy(), self.priors, self.model.variances, (self.size, self.size))
        return boxes, torch.softmax(logits[0], -1)[:, 1:].numpy()

    def _window_origin(self, rgb: np.ndarray, box, c) -> tuple[int, int]:
        H, W = rgb.shape[:2]
        S = self.size
        if H <= S and W <= S:
            return 0, 0
        if box is not None:
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            return int(np.clip(round(cx - S / 2), 0, max(0, W - S))), int(np.clip(round(cy - S / 2), 0, max(0, H - S)))
        best, origin = -1.0, (0, 0)
        for t in tile_grid(H, W, S, S // 4).tiles:
            _, probs = self._prior_table(self._window(rgb, t.x0, t.y0))
            s = float(probs.max() if c is None else probs[:, c].max())
            if s > best:
                best, origin = s, (t.x0, t.y0)
        return origin

    def _window(self, rgb: np.ndarray, x0: int, y0: int) -> np.ndarray:
        S = self.size
        win = np.zeros((3, S, S), np.float32)
        part = to_chw(rgb[y0:y0 + S, x0:x0 + S])
        win[:, : part.shape[1], : part.shape[2]] = part
        return win

    def _explain_detection(self, rgb, box, c, **opts) -> Explanation:
        H, W = rgb.shape[:2]
        x0, y0 = self._window_origin(rgb, box, c)
        win = self._window(rgb, x0, y0)
        boxes, probs = self._prior_table(win)
        scores = probs.max(1) if c is None else probs[:, c]
        if box is not None:
            local = np.asarray(box, np.float32).reshape(1, 4) - np.asarray([x0, y0, x0, y0], np.float32)
            cand = np.flatnonzero(scores >= 0.05)
            cand = cand if cand.size else np.arange(len(scores))
            iou = box_iou(local, boxes[cand])[0]
            if iou.max() <= 0:
                raise BadInput(f"no detection overlaps --box {','.join(f'{v:g}' for v in box)}; "
                               "give a box around a detected cell, or leave --box out for the top detection")
            p = int(cand[np.lexsort((-scores[cand], -iou))[0]])
            match_iou = float(iou.max())
        else:
            p, match_iou = int(scores.argmax()), None
        c = int(probs[p].argmax()) if c is None else c

        def fn(b: torch.Tensor) -> torch.Tensor:
            _, logits = self.model(self.normalize(b))
            return torch.softmax(logits[:, p], -1)[:, c + 1]

        ig = self._ig(fn, win, **opts)
        attr = np.zeros((3, H, W), np.float32)
        h, w = min(self.size, H - y0), min(self.size, W - x0)
        attr[:, y0:y0 + h, x0:x0 + w] = ig.attributions[:, :h, :w]
        det_box = (boxes[p] + np.asarray([x0, y0, x0, y0], np.float32)).round(1).tolist()
        info = {"kind": "detector", "arch": self.arch, "class": self.classes[c], "prior": p,
                "detection_box": det_box, "detection_score": round(float(probs[p, c]), 5),
                "match_iou": match_iou, "window_xyxy": [x0, y0, x0 + self.size, y0 + self.size],
                "attribution_outside_image": float(ig.attributions.sum() - attr.sum())}
        return Explanation(ig, overlay(rgb, attribution_map(attr), box=det_box), info)


def explain_folder(explainer: Explainer, root, out=None, *, force: bool = False, progress=None,
                   **opts) -> dict:
    """Explain every crop under `root`; results by the convention of cyto_edge/explain_service.py.
    Unreadable crops are counted and listed, never fatal; up-to-date results are kept unless `force`."""
    from cyto_edge.explain_service import find_crops, result_paths, save_result, up_to_date
    from cyto_edge.train.explain import encode_png, read_rgb

    crops = find_crops(root)
    summary = {"crops": len(crops), "explained": 0, "up_to_date": 0, "failed": [], "max_relative_error": 0.0}
    for crop in crops:
        png_path, info_path = result_paths(crop, root, out)
        if not force and up_to_date(crop, png_path):
            summary["up_to_date"] += 1
        else:
            try:
                ex = explainer.explain(read_rgb(crop), **opts)
            except BadInput as e:
                summary["failed"].append({"crop": str(crop), "reason": str(e)})
            else:
                info = {"crop": str(crop), "checkpoint": str(explainer.path), **ex.to_json()}
                save_result(png_path, info_path, encode_png(ex.overlay), info)
                summary["explained"] += 1
                summary["max_relative_error"] = max(summary["max_relative_error"], ex.ig.relative_error)
        if progress:
            progress()
    return summary
