"""The training loop shared by `train` and `distill`: data, model, MultiBox (+ extra loss components such as
local distillation and MIL), AdamW, warm-up + cosine, EMA, AMP on CUDA, DDP via torchrun, atomic
checkpoints every epoch, `--resume`, best-by-validation-mAP, NaN guard, Ctrl-C safe."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from torch.utils.data import DataLoader

from cyto_edge.errors import BadInput, CheckFailed
from cyto_edge.provenance import git_revision, versions
from cyto_edge.runtime.taxonomy import Taxonomy
from cyto_edge.train import checkpoint as ckpt_io
from cyto_edge.train.config import TrainConfig, config_to_dict
from cyto_edge.train.data.torch_data import MEAN, STD, AugConfig, CropDataset, balanced_weights, collate
from cyto_edge.train.losses.multibox import MultiBoxLoss
from cyto_edge.train.models.detector import create_model, model_info, spec_dict
from cyto_edge.train.utils import MetricLog, ModelEMA, ddp_env, lr_factor, param_groups, resolve_device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def load_data(cfg: TrainConfig):
    """(train, val) DetectionDatasets: val carved from the train split with a seed, never from test."""
    from cyto_edge.train.data.load import load_detection
    from cyto_edge.train.data.split import split_dataset

    ds = load_detection(cfg.data.root, split=cfg.data.split, mapping=cfg.data.mapping)
    if len(ds) == 0:
        raise BadInput(f"{cfg.data.root}: the {cfg.data.split} split has no images")
    if cfg.data.um_per_px:
        ds.um_per_px = cfg.data.um_per_px
    if cfg.data.classes is not None and list(cfg.data.classes) != list(ds.classes):
        raise BadInput(f"{cfg.data.root}: dataset classes {ds.classes} do not match data.classes {cfg.data.classes}")
    if cfg.data.val_fraction > 0 and len(ds) >= 5:
        train, val = split_dataset(ds, cfg.data.val_fraction, cfg.data.split_seed)
    else:
        train, val = ds, ds.subset([])
    return ds, train, val


class Trainer:
    """One training run. `components` add losses (distillation, MIL): objects with `losses(batch, feats, loc,
    logits, step) -> dict`, `modules() -> list[nn.Module]` (trained with the student), `state_dict()`,
    `load_state_dict()`, and `check(model, dataset)` (raises BadInput before training when incompatible).
    Optional: `attach(trainer)` (called once setup is complete: the train split, crops, config) and
    `inference_model(model) -> nn.Module` (what validation runs, e.g. the detector with its MIL head)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, console: Console | None = None,
                 components: list | None = None, out_dir: Path | None = None):
        self.cfg = cfg
        self.rank, self.world, self.local_rank = ddp_env()
        self.console = console or Console(stderr=True)
        self.components = list(components or [])
        self.out = Path(out_dir or cfg.out_dir / cfg.name)
        self.resume = resume
        self.main = self.rank == 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
            dist.init_process_group(backend)
        self.device = resolve_device(cfg.device, self.local_rank)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_everything(cfg.seed + self.rank)
        self.full, self.train_ds, self.val_ds = load_data(cfg)
        self.taxonomy = self.full.taxonomy or Taxonomy.for_classes(self.full.classes)
        if self.train_ds.um_per_px is None and cfg.model.um_per_px is None:
            self.console.print("[yellow]warning:[/] the dataset does not record its µm/px; assuming 1.0")
        self.um_per_px = cfg.model.um_per_px or self.train_ds.um_per_px or 1.0
        kw = dict(cfg.model.kwargs)
        self.model = create_model(cfg.model.name, num_classes=self.full.num_classes, input_size=cfg.model.input_size, **kw)
        if cfg.model.init:
            self._init_weights(cfg.model.init)
        self.model.to(self.device)
        for c in self.components:
            c.check(self.model, self.full, self.um_per_px)
            for m in c.modules():
                m.to(self.device)
        self.loss = MultiBoxLoss(self.model.priors, self.model.variances, cfg.loss.iou_threshold,
                                 cfg.loss.neg_pos_ratio, cfg.loss.alpha, cfg.loss.min_negatives).to(self.device)
        extra = [m for c in self.components for m in c.modules()]
        self.opt = torch.optim.AdamW(param_groups([self.model, *extra], cfg.optim.weight_decay), lr=cfg.optim.lr)
        self.ema = ModelEMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.amp = cfg.optim.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.step, self.best, self.history = 0, -1.0, []
        if self.resume:
            self._resume()
        self.net = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        aug = AugConfig(**cfg.aug.model_dump())
        weights = balanced_weights(self.train_ds, cfg.data.balance) if cfg.data.balance > 0 else None
        self.crops = CropDataset(self.train_ds, self.model.spec.input_size, self.um_per_px,
                                 cfg.schedule.steps_per_epoch * cfg.optim.batch_size,
                                 seed=cfg.seed * 1000 + self.rank, aug=aug, weights=weights)
        for c in self.components:
            if hasattr(c, "attach"):
                c.attach(self)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.log = MetricLog(self.out, cfg.tensorboard)
            info = model_info(self.model)
            self.console.print(f"[bold]{cfg.model.name}[/] {info['params_m']} M params, {info['gflops']} GFLOPs at "
                               f"{info['input_size']}², {info['num_priors']} priors; {len(self.train_ds)} train / "
                               f"{len(self.val_ds)} val images at {self.um_per_px} µm/px; device {self.device}"
                               + (f" x{self.world}" if self.world > 1 else ""))

    def _init_weights(self, path: Path) -> None:
        src = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(src, dict) and src.get("format") == ckpt_io.FORMAT:
            if list(src["classes"]) != list(self.full.classes):
                raise BadInput(f"{path}: checkpoint classes {src['classes']} do not match the dataset's {self.full.classes}")
            sd = src.get("ema_state_dict") or src["state_dict"]
        else:
            sd = src.get("state_dict", src) if isinstance(src, dict) else src
        own = self.model.state_dict()
        ok = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        self.model.load_state_dict(ok, strict=False)
        if self.main:
            self.console.print(f"initialised {len(ok)}/{len(own)} tensors from {path}")

    def _resume(self) -> None:
        last = self.out / "last.pt"
        if not last.exists():
            raise BadInput(f"--resume: no checkpoint at {last}")
        ck = ckpt_io.load_checkpoint(last)
        if list(ck["classes"]) != list(self.full.classes):
            raise BadInput(f"{last}: checkpoint classes do not match the dataset")
        if ck.get("slim"):
            raise BadInput(f"{last}: a slim checkpoint (`cyto-edge slim`) has no optimizer state and cannot be "
                           f"resumed; start from it with --set model.init={last} instead")
        self.model.load_state_dict(ck["state_dict"])
        if self.ema and ck.get("ema_state_dict"):
            self.ema.module.load_state_dict(ck["ema_state_dict"])
            self.ema.updates = ck.get("ema_updates", 0)
        self.opt.load_state_dict(ck["optimizer"])
        for c, sd in zip(self.components, ck.get("components", [])):
            c.load_state_dict(sd)
        self.step, self.best, self.history = ck["step"], ck.get("best_map50", -1.0), ck.get("history", [])
        if self.main:
            self.console.print(f"resumed from {last} at step {self.step}")

    # ------------------------------------------------------------------ checkpointing
    def state(self) -> dict:
        m = self.model
        return {
            "model": spec_dict(m), "state_dict": m.state_dict(),
            "ema_state_dict": self.ema.module.state_dict() if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "classes": list(self.full.classes), "bethesda": {c: self.taxonomy.mapping[c] for c in self.full.classes},
            "organisms": list(self.taxonomy.organisms), "um_per_px": self.um_per_px,
            "normalization": {"mean": list(MEAN), "std": list(STD), "scale": 1 / 255.0, "color": "RGB"},
            "priors": m.priors_numpy(), "variances": list(m.variances), "prior_spec": m.prior_spec.to_dict(),
            "tile_overlap": self.cfg.eval.tile_overlap,
            "config": config_to_dict(self.cfg), "dataset_fingerprint": self.full.fingerprint(),
            "git_revision": git_revision(), "versions": versions(),
            "step": self.step, "epoch": self.step // self.cfg.schedule.steps_per_epoch,
            "best_map50": self.best, "history": self.history, "optimizer": self.opt.state_dict(),
            "components": [c.state_dict() for c in self.components],
            "component_meta": [c.meta() for c in self.components if hasattr(c, "meta")],
        }

    def save(self, name: str) -> Path:
        return ckpt_io.save_checkpoint(self.out / name, self.state())

    # ------------------------------------------------------------------ one step
    def compute_losses(self, batch: dict) -> dict:
        with torch.autocast("cuda", enabled=self.amp):
            loc, logits, feats = self.net(batch["image"], return_features=True)  # via DDP when distributed
            losses = self.loss(loc.float(), logits.float(), batch["boxes"], batch["labels"], batch["valid"],
                               batch["boxed"], batch["ignore"])
            total = losses["multibox"]
            for c in self.components:
                extra = c.losses(batch, feats, loc, logits, self.step)
                for k, v in extra.items():
                    losses[k] = v
                    if not k.startswith("_"):
                        total = total + v
        losses["total"] = total
        return losses

    def train_step(self, batch: dict) -> dict:
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = cfg.optim.lr * lr_factor(self.step, cfg.total_steps, cfg.optim.warmup_steps)
        batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        losses = self.compute_losses(batch)
        if not torch.isfinite(losses["total"]):
            raise CheckFailed(f"loss is {float(losses['total'])} at step {self.step}; stopped. The last good "
                              f"checkpoint is {self.out / 'last.pt'} (lower optim.lr or check the data)")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(losses["total"]).backward()
        if self.world > 1:  # component modules (adaptation layers, MIL head) live outside DDP
            for c in self.components:
                for m in c.modules():
                    for p in m.parameters():
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                            p.grad /= self.world
        if cfg.optim.grad_clip:
            self.scaler.unscale_(self.opt)
            params = [p for g in self.opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.ema:
            self.ema.update(self.model)
        self.step += 1
        return {k: float(v.detach()) for k, v in losses.items()}

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict:
        from cyto_edge.train.evaluate import evaluate_model

        if len(self.val_ds) == 0:
            return {}
        model = self.ema.module if self.ema else self.model
        for c in self.components:
            if hasattr(c, "inference_model"):
                model = c.inference_model(model)
        e = self.cfg.eval
        metrics, _ = evaluate_model(model, self.val_ds, model_um_per_px=self.um_per_px, overlap=e.tile_overlap,
                                    mean=MEAN, std=STD, score_threshold=e.score_threshold, nms_iou=e.nms_iou,
                                    max_detections=e.max_detections, batch_size=e.batch_size,
                                    max_images=self.cfg.data.max_val_images)
        return {"val_map50": metrics.map50 or 0.0, "val_map": metrics.map or 0.0}

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        from cyto_edge.train.progress import TrainProgress

        self.setup()
        cfg = self.cfg
        spe, total = cfg.schedule.steps_per_epoch, cfg.total_steps
        t0 = time.time()
        progress = TrainProgress(total, self.step, enabled=self.main, console=self.console)
        try:
            with progress:
                while self.step < total:
                    epoch, offset = divmod(self.step, spe)
                    self.crops.set_epoch(epoch)
                    idx = list(range(offset * cfg.optim.batch_size, spe * cfg.optim.batch_size))
                    loader = DataLoader(torch.utils.data.Subset(self.crops, idx), batch_size=cfg.optim.batch_size,
                                        shuffle=False, num_workers=cfg.workers, collate_fn=collate,
                                        persistent_workers=False, pin_memory=self.device.type == "cuda")
                    sums: dict[str, float] = {}
                    for batch in loader:
                        vals = self.train_step(batch)
                        for k, v in vals.items():
                            sums[k] = sums.get(k, 0.0) + v
                        progress.update(self.step, vals["total"], self.opt.param_groups[0]["lr"])
                        if self.step % spe == 0 or self.step >= total:
                            break
                    self._end_epoch(epoch, sums, spe - offset, progress)
            sync = self._ranks_in_sync()
        except KeyboardInterrupt:
            if self.main:
                path = self.save("last.pt")
                self.console.print(f"interrupted at step {self.step}; resumable checkpoint {path} "
                                   f"(run again with --resume)")
            raise
        finally:
            if self.main and hasattr(self, "log"):
                self.log.close()
            if self.world > 1 and dist.is_initialized():
                dist.destroy_process_group()
        result = {"out_dir": str(self.out), "best": str(self.out / "best.pt"), "last": str(self.out / "last.pt"),
                  "best_map50": self.best, "steps": self.step, "minutes": round((time.time() - t0) / 60, 2),
                  "world_size": self.world, "ranks_in_sync": sync}
        if self.main:
            (self.out / "result.json").write_text(__import__("json").dumps(result, indent=2))
        return result

    def _ranks_in_sync(self) -> bool:
        """DDP sanity check: every rank ends with the same weights (a checksum gathered from all ranks)."""
        if self.world == 1:
            return True
        with torch.no_grad():
            s = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).sum().reshape(1)
            s = s.to(self.device) if self.device.type == "cuda" else s.cpu()
        gathered = [torch.zeros_like(s) for _ in range(self.world)]
        dist.all_gather(gathered, s)
        return bool(all(torch.allclose(g, gathered[0], rtol=1e-9, atol=1e-9) for g in gathered))

    def _end_epoch(self, epoch: int, sums: dict, n: int, progress) -> None:
        cfg = self.cfg
        row = {f"train_{k}": v / max(1, n) for k, v in sums.items()}
        row["lr"] = self.opt.param_groups[0]["lr"]
        row["epoch"] = epoch + 1
        last_epoch = self.step >= cfg.total_steps
        if self.main and ((epoch + 1) % cfg.schedule.eval_every == 0 or last_epoch):
            progress.note("validating")
            row.update(self.validate())
        if self.main:
            self.history.append(row)
            self.log.log(self.step, row)
            val = row.get("val_map50")
            if val is not None and val > self.best:
                self.best = val
                self.save("best.pt")
            elif val is None and last_epoch and not (self.out / "best.pt").exists():
                self.save("best.pt")
            self.save("last.pt")
            msg = f"epoch {epoch + 1}/{cfg.schedule.epochs} step {self.step} loss {row.get('train_total', math.nan):.3f}"
            if val is not None:
                msg += f" val mAP@0.5 {val:.3f} (best {self.best:.3f})"
            progress.log(msg)
        if self.world > 1:
            dist.barrier()
