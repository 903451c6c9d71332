"""The MIL component of the training loop (`mil:` in a recipe): LD-WSCCD's MIL detector with OICR
refinement (eq. 15-16; models/mil_head.py, losses/mil.py), trained with the student:

    L = MultiBox + [L_dis] + cls_weight L_cls + ref_weight L_ref + pseudo_weight L_pseudo

Bags, and why:
- A boxed training crop is a bag whose labels are exact: the classes of the boxes visible in it. Its
  proposals are the SSD's top-K decoded priors (detached) plus its ground-truth boxes (also seeds).
- A weak image (image-level labels only) is NOT trained as a crop bag: a random 320 px crop of a field
  often misses the labelled object, and its image label would be wrong. Instead every step takes
  `weak_bags` whole weak fields at the model's scale (the backbone is fully convolutional; fields larger
  than `bag_max_side` go through in windows whose proposals are pooled into the same bag), so the bag is
  exactly the image the label describes. Proposals: the square priors of the coarser levels (stride ≥
  `prior_min_stride`) laid over the field, plus, when boxed images train the SSD, its top decoded boxes.
- The weak crops of the batch learn from pseudo-boxes once `pseudo_start` of training has passed: the
  SSD's top proposals re-scored by the refined MIL scores exactly as at inference (runtime/rescore.py),
  kept above `pseudo_threshold` for the image's labelled classes, are MultiBox targets for that crop; a
  weak crop with no such box is left out (it may hold an unfound object, so it is not all background).
With image-level labels only (no boxed image), proposals are the coarse priors everywhere.
The head keeps an EMA of its weights alongside the student's EMA: validation and export use both.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from cyto_edge.errors import BadInput
from cyto_edge.train.config import MilCfg
from cyto_edge.train.data.torch_data import PAD_RGB, normalize
from cyto_edge.train.losses.mil import oicr_losses, pseudo_boxes
from cyto_edge.train.losses.multibox import MultiBoxLoss
from cyto_edge.train.models.mil_head import (MilDetector, MilHead, cxcywh_to_xyxy_clipped, field_priors,
                                             top_proposals)
from cyto_edge.train.utils import ModelEMA

SQUARE_ANCHORS = [0, 1]  # the two 1:1 anchors of every cell (s_k and sqrt(s_k s_k+1))


def coarse_levels(model, min_stride: int) -> list[int]:
    S = model.spec.input_size
    return [lv for lv, (_, fw) in enumerate(model.prior_spec.feature_sizes) if S / fw >= min_stride - 1e-6]


def bag_proposals(model, feats, image_hw, levels, ssd_k: int | None) -> torch.Tensor:
    """Proposals of one whole-field window: coarse square priors (+ the SSD's top decoded boxes), (R, 4) xyxy px."""
    sizes = [tuple(f.shape[-2:]) for f in feats]
    coarse = field_priors(model.prior_spec, sizes, image_hw, levels, SQUARE_ANCHORS)
    props = [torch.from_numpy(cxcywh_to_xyxy_clipped(coarse, image_hw)).to(feats[0].device)]
    if ssd_k:
        with torch.no_grad():
            loc, logits = model.predict(feats)
            pri = torch.from_numpy(field_priors(model.prior_spec, sizes, image_hw)).to(loc.device)
            _, boxes, _ = top_proposals(loc, logits, pri, model.variances, (1, 1), ssd_k)
            H, W = image_hw
            props.append(torch.minimum(boxes[0].clamp(min=0), boxes.new_tensor([W, H, W, H])))
    return torch.cat(props)


def field_bag(model, head: MilHead, x: torch.Tensor, level: int, levels: list[int], ssd_k: int | None,
              max_side: int, max_props: int, rng: np.random.Generator | None):
    """One bag from a whole field x (1, 3, H, W): region embeddings h (1, R, hidden) and boxes (1, R, 4) px.
    Fields larger than `max_side` are cut into windows; their proposals are pooled into the one bag."""
    H, W = x.shape[-2:]
    hs, bs = [], []
    for y0 in range(0, H, max_side):
        for x0 in range(0, W, max_side):
            xw = x[..., y0:y0 + max_side, x0:x0 + max_side]
            hw = tuple(xw.shape[-2:])
            feats = model.features(xw)
            area = hw[0] * hw[1] / model.spec.input_size ** 2
            props = bag_proposals(model, feats, hw, levels, int(ssd_k * area) if ssd_k else None)
            cap = max(1, int(max_props * hw[0] * hw[1] / (H * W)))
            if rng is not None and len(props) > cap:
                props = props[torch.from_numpy(rng.choice(len(props), cap, replace=False)).to(props.device)]
            hs.append(head.embed(feats[level], props[None], hw[1]))
            bs.append(props + props.new_tensor([x0, y0, x0, y0]))
    return torch.cat(hs, 1), torch.cat(bs)[None]


def _mu_stats(pairs: list, kind: str) -> dict:
    """Logged only: mean μ over labelled (present) and over absent classes of this step's bags."""
    if not pairs:
        return {}
    mu = torch.cat([m for m, _ in pairs]).detach()
    y = torch.cat([t for _, t in pairs]) > 0.5
    out = {f"_mil_{kind}_mu_neg": mu[~y].mean()} if bool((~y).any()) else {}
    if bool(y.any()):
        out[f"_mil_{kind}_mu_pos"] = mu[y].mean()
    return out


def pad_to(img: np.ndarray, multiple: int = 32) -> np.ndarray:
    """(H, W, 3) uint8 padded bottom/right with the normalization mean to a multiple of `multiple`."""
    H, W = img.shape[:2]
    Hp, Wp = -(-H // multiple) * multiple, -(-W // multiple) * multiple
    if (Hp, Wp) == (H, W):
        return img
    out = np.empty((Hp, Wp, 3), np.uint8)
    out[:] = PAD_RGB
    out[:H, :W] = img
    return out


class MilComponent:
    def __init__(self, cfg: MilCfg):
        self.cfg = cfg
        self.head: MilHead | None = None
        self.ema: ModelEMA | None = None
        self._pending_ema: dict | None = None
        self._ema_step = -1
        self.trainer = None

    # ------------------------------------------------------------------ setup
    def check(self, model, dataset, um_per_px: float) -> None:
        c = self.cfg
        n = len(model.prior_spec.feature_sizes)
        if not 0 <= c.level < n:
            raise BadInput(f"mil.level: {c.level} is not a feature level of {model.spec.name} (0..{n - 1})")
        if c.rescore > 0 and c.refine_stages == 0:
            raise BadInput("mil.refine_stages: re-scoring (mil.rescore > 0) needs at least one refinement stage")
        self.levels = coarse_levels(model, c.prior_min_stride)
        if not self.levels:
            raise BadInput(f"mil.prior_min_stride: {model.spec.name} has no level of stride ≥ {c.prior_min_stride}")
        boxed = sum(1 for im in dataset.images if im.boxed)
        self.mode = c.proposal_source if c.proposal_source != "auto" else ("ssd" if boxed else "priors")
        self.model = model
        self.in_channels = int(model.backbone.out_channels[c.level])
        self.head = MilHead(self.in_channels, model.num_classes, roi_size=c.roi_size,
                            hidden=c.hidden, reduce=c.reduce, refine_stages=c.refine_stages)
        S = model.spec.input_size
        pri = field_priors(model.prior_spec, model.prior_spec.feature_sizes, (S, S), self.levels, SQUARE_ANCHORS)
        self.crop_priors = torch.from_numpy(cxcywh_to_xyxy_clipped(pri, (S, S)))   # (Pc, 4) xyxy px

    def attach(self, trainer) -> None:
        """Called by the loop once set up: the train split (weak fields), the crop scale, the schedule."""
        self.trainer = trainer
        cfg = trainer.cfg
        self.seed, self.rank = cfg.seed, int(os.environ.get("RANK", "0"))
        self.total_steps = cfg.total_steps
        self.train_ds, self.cache, self.factor = trainer.train_ds, trainer.crops.cache, trainer.crops.factor
        self.weak = [i for i, im in enumerate(self.train_ds.images) if not im.boxed]
        L = cfg.loss
        self.multibox = MultiBoxLoss(trainer.model.priors, trainer.model.variances, L.iou_threshold,
                                     L.neg_pos_ratio, L.alpha, L.min_negatives).to(trainer.device)
        if cfg.optim.ema_decay:
            self.ema = ModelEMA(self.head, cfg.optim.ema_decay)
            if self._pending_ema:
                self.ema.module.load_state_dict(self._pending_ema["ema"])
                self.ema.updates = self._pending_ema.get("ema_updates", 0)

    def modules(self) -> list[torch.nn.Module]:
        return [self.head]

    # ------------------------------------------------------------------ losses
    def losses(self, batch: dict, feats, loc, logits, step: int) -> dict:
        c = self.cfg
        if self.ema is not None and step > self._ema_step:  # the head's EMA after the previous update
            self.ema.update(self.head)
            self._ema_step = step
        zero = sum(p.sum() for p in self.head.parameters()) * 0.0   # every rank's head gets a gradient
        acc = {"cls": zero, "ref": zero, "n": 0, "mu": [], "field_mu": []}
        pseudo = self.trainer is not None and step >= c.pseudo_start * self.total_steps
        rows = batch["boxed"] & (self.mode == "ssd")
        if pseudo:
            rows = rows | ~batch["boxed"]
        out: dict = {}
        if bool(rows.any()):
            out.update(self._crop_losses(batch, feats, loc, logits, rows, acc, pseudo))
        if self.trainer is not None and self.weak and c.weak_bags:
            self._field_losses(step, acc)
        n = max(1, acc["n"])
        out["mil_cls"] = c.cls_weight * acc["cls"] / n
        out["mil_ref"] = c.ref_weight * acc["ref"] / n
        out.setdefault("mil_pseudo", zero)
        out["_mil_bags"] = torch.tensor(float(acc["n"]))
        out.update(_mu_stats(acc["mu"], "crop"))
        out.update(_mu_stats(acc["field_mu"], "field"))
        return out

    def _crop_proposals(self, loc, logits, gt_px, gt_valid):
        """(N, R, 4) px proposals, mask (N, R), top indices (N, K) and SSD probs (or None in priors mode)."""
        N = loc.shape[0]
        S = self.model.spec.input_size
        if self.mode == "ssd":
            idx, props, probs = top_proposals(loc.detach(), logits.detach(), self.model.priors, self.model.variances,
                                              (S, S), self.cfg.proposals)
        else:
            idx, probs = None, None
            props = self.crop_priors.to(loc.device)[None].expand(N, -1, -1)
        mask = torch.ones(props.shape[:2], dtype=torch.bool, device=loc.device)
        props = torch.cat([props, gt_px], 1)
        mask = torch.cat([mask, gt_valid], 1)
        return props, mask, idx, probs

    def _crop_losses(self, batch, feats, loc, logits, rows, acc, pseudo: bool) -> dict:
        c = self.cfg
        S = self.model.spec.input_size
        boxed = batch["boxed"][rows]
        gt_px, gt_lab, gt_ok = batch["boxes"][rows] * S, batch["labels"][rows], batch["valid"][rows] & boxed[:, None]
        props, mask, idx, probs = self._crop_proposals(loc[rows], logits[rows], gt_px, gt_ok)
        cls, det, ref = self.head.streams(self.head.embed(feats[c.level][rows], props, S))
        b = boxed
        if self.mode == "ssd" and bool(b.any()):
            y = torch.zeros(int(b.sum()), self.model.num_classes, device=loc.device)
            lab = gt_lab[b].masked_fill(~gt_ok[b], 0)
            y = y.scatter_add(1, lab, gt_ok[b].float()).clamp(max=1.0)              # classes seen in the crop
            L = oicr_losses(cls[b], det[b], [r[b] for r in ref], props[b], mask[b], y, c.iou_threshold,
                            gt=(gt_px[b], gt_lab[b], gt_ok[b]))
            k = int(b.sum())
            acc["cls"], acc["ref"], acc["n"] = acc["cls"] + L["cls"] * k, acc["ref"] + L["ref"] * k, acc["n"] + k
            acc["mu"].append((L["mu"], y))
        w = ~b
        if not (pseudo and bool(w.any())):
            return {}
        return self._pseudo_loss(batch, loc, logits, rows, w, props, mask, idx, probs, ref)

    def _pseudo_loss(self, batch, loc, logits, rows, w, props, mask, idx, probs, ref) -> dict:
        c = self.cfg
        S = self.model.spec.input_size
        with torch.no_grad():
            q = torch.stack([F.softmax(r[w].float(), -1) for r in ref]).mean(0)     # (Nw, R, C+1)
            if idx is not None:  # re-scored as at inference, on the SSD's top-K part of the bag
                K = idx.shape[1]
                ssd = torch.gather(probs[w], 1, idx[w][..., None].expand(-1, -1, q.shape[-1]))
                q = (1 - c.rescore) * ssd + c.rescore * q[:, :K]
                props, mask = props[w][:, :K], mask[w][:, :K]
            else:
                props, mask = props[w], mask[w]
            y = batch["image_labels"][rows][w]
            gb, gl, gv = pseudo_boxes(q, props, mask, y, c.pseudo_threshold)
        has = gv.any(1)
        n_boxed = int(batch["boxed"].sum())
        out = {"_mil_pseudo_boxes": gv.sum().float(), "_mil_pseudo_images": has.sum().float()}
        if bool(has.any()):
            mb = self.multibox(loc[rows][w].float(), logits[rows][w].float(), gb / S, gl, gv, has)
            scale = min(1.0, int(has.sum()) / max(1, n_boxed))
            out["mil_pseudo"] = c.pseudo_weight * scale * mb["multibox"]
        return out

    def _field_losses(self, step: int, acc: dict) -> None:
        c = self.cfg
        rng = np.random.default_rng([self.seed, step, self.rank, 7])
        dev = next(self.head.parameters()).device
        for _ in range(c.weak_bags):
            rec = self.train_ds.images[self.weak[int(rng.integers(len(self.weak)))]]
            img = self.cache.get(str(rec.file), self.factor)
            if rng.random() < 0.5:
                img = img[:, ::-1]
            if rng.random() < 0.5:
                img = img[::-1]
            x = torch.from_numpy(normalize(pad_to(np.ascontiguousarray(img))))[None].to(dev)
            ssd_k = self.cfg.proposals if self.mode == "ssd" else None
            h, boxes = field_bag(self.model, self.head, x, c.level, self.levels, ssd_k, c.bag_max_side,
                                 c.bag_proposals, rng)
            cls, det, ref = self.head.streams(h)
            y = torch.zeros(1, self.model.num_classes, device=dev)
            for k in rec.classes_present:
                y[0, k] = 1.0
            mask = torch.ones(boxes.shape[:2], dtype=torch.bool, device=dev)
            L = oicr_losses(cls, det, ref, boxes, mask, y, c.iou_threshold)
            acc["cls"], acc["ref"], acc["n"] = acc["cls"] + L["cls"], acc["ref"] + L["ref"], acc["n"] + 1
            acc["field_mu"].append((L["mu"], y))

    # ------------------------------------------------------------------ inference, checkpoints
    def inference_model(self, model) -> MilDetector:
        head = self.ema.module if self.ema is not None else self.head
        return MilDetector(model, head, level=self.cfg.level, topk=self.cfg.proposals,
                           rescore_weight=self.cfg.rescore).eval()

    def meta(self) -> dict:
        return {"kind": "mil", "mode": self.mode, "in_channels": self.in_channels, "num_classes": self.head.num_classes,
                **self.cfg.model_dump(mode="json")}

    def state_dict(self) -> dict:
        return {"kind": "mil", "meta": self.meta(), "head": self.head.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema else None,
                "ema_updates": self.ema.updates if self.ema else 0}

    def load_state_dict(self, sd: dict) -> None:
        self.head.load_state_dict(sd["head"])
        if sd.get("ema"):
            if self.ema is not None:
                self.ema.module.load_state_dict(sd["ema"])
                self.ema.updates = sd.get("ema_updates", 0)
            else:
                self._pending_ema = sd


def mil_state(ck: dict) -> dict | None:
    """The MIL component's saved state in a checkpoint, or None."""
    for sd in ck.get("components") or []:
        if isinstance(sd, dict) and sd.get("kind") == "mil":
            return sd
    return None


def head_from_state(sd: dict, ema: bool = True) -> MilHead:
    m = sd["meta"]
    head = MilHead(m["in_channels"], m["num_classes"], roi_size=m["roi_size"], hidden=m["hidden"],
                   reduce=m["reduce"], refine_stages=m["refine_stages"])
    head.load_state_dict(sd["ema"] if ema and sd.get("ema") else sd["head"])
    return head.eval()


def inference_model_from_checkpoint(ck: dict, ema: bool = True):
    """The detector of a checkpoint, with its MIL head (MilDetector, three outputs) when it was trained with
    one and the head re-scores (refinement stages and a weight > 0); else the plain SSD (two outputs)."""
    from cyto_edge.train.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(ck, ema=ema)
    sd = mil_state(ck)
    if sd is None or not sd["meta"]["refine_stages"] or sd["meta"]["rescore"] <= 0:
        return model
    m = sd["meta"]
    return MilDetector(model, head_from_state(sd, ema), level=m["level"], topk=m["proposals"],
                       rescore_weight=m["rescore"]).eval()
