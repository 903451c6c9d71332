"""The local-distillation component of the training loop (`cyto-edge distill`): a frozen teacher in eval
mode, the adaptation layers, and L_dis added to MultiBox (train/losses/distill.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from cyto_edge.errors import BadInput
from cyto_edge.train.checkpoint import load_checkpoint, model_from_checkpoint
from cyto_edge.train.config import DistillCfg
from cyto_edge.train.losses.distill import LocalDistillLoss, match_levels


class LocalDistillation:
    def __init__(self, cfg: DistillCfg, teacher: Path | None = None):
        self.cfg = cfg
        self.path = Path(teacher or cfg.teacher or "")
        if not str(self.path) or not self.path.is_file():
            raise BadInput(f"--teacher {self.path}: no such checkpoint (train a teacher with `cyto-edge train`)")
        self.ck = load_checkpoint(self.path)
        self.teacher = model_from_checkpoint(self.ck, ema=True)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.loss: LocalDistillLoss | None = None

    def check(self, student, dataset, um_per_px: float) -> None:
        """Refuse, before training, a teacher whose classes, input size or scale differ from the student's."""
        ck = self.ck
        if list(ck["classes"]) != list(dataset.classes):
            raise BadInput(f"{self.path}: teacher classes {ck['classes']} differ from the dataset's {dataset.classes}")
        if ck["model"]["input_size"] != student.spec.input_size:
            raise BadInput(f"{self.path}: teacher input {ck['model']['input_size']}² differs from the student's "
                           f"{student.spec.input_size}²; distil at the same input size")
        if abs(float(ck["um_per_px"]) - float(um_per_px)) > 0.01 * float(um_per_px):
            raise BadInput(f"{self.path}: teacher scale {ck['um_per_px']} µm/px differs from the student's {um_per_px}")
        S = student.spec.input_size
        with torch.no_grad():
            s_sizes = [tuple(s) for s in student.prior_spec.feature_sizes]
            t_sizes = [tuple(s) for s in self.teacher.prior_spec.feature_sizes]
        pairs = match_levels(t_sizes, s_sizes)
        if self.cfg.levels is not None:
            bad = [lv for lv in self.cfg.levels if not 0 <= lv < len(s_sizes)]
            if bad:
                raise BadInput(f"distill.levels: {bad} are not student levels (0..{len(s_sizes) - 1})")
            pairs = [p for p in pairs if p[0] in self.cfg.levels]
        c = self.cfg
        self.loss = LocalDistillLoss(list(student.backbone.out_channels), list(self.teacher.backbone.out_channels),
                                     pairs, c.temperature, c.alpha, c.beta, c.gamma)
        self.pairs = pairs
        self.input_size = S

    def modules(self) -> list[torch.nn.Module]:
        return [self.loss]

    def losses(self, batch: dict, feats, loc, logits, step: int) -> dict:
        dev = batch["image"].device
        if next(self.teacher.parameters()).device != dev:
            self.teacher.to(dev)
        self.teacher.eval()
        with torch.no_grad():
            t_feats = self.teacher.features(batch["image"])
        present = batch["valid"] | batch["ignore"]          # every object is foreground for eq. 9
        out = self.loss(feats, t_feats, batch["boxes"], present)
        w = self.cfg.weight
        out["ld_fea"] = out["ld_fea"] * w
        out["ld_att"] = out["ld_att"] * w
        return out

    def state_dict(self) -> dict:
        return {"adapt": self.loss.state_dict() if self.loss else None}

    def load_state_dict(self, sd: dict) -> None:
        if self.loss is not None and sd.get("adapt"):
            self.loss.load_state_dict(sd["adapt"])

    def meta(self) -> dict:
        from cyto_edge.runtime.bundle import sha256_file

        return {"kind": "local_distillation", "teacher": str(self.path), "teacher_sha256": sha256_file(self.path),
                "teacher_model": self.ck["model"], "pairs": self.pairs, **self.cfg.model_dump(mode="json")}
