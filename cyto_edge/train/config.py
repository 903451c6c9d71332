"""Training configuration: pydantic models loaded from YAML, with `--set key=value` overrides.

A recipe is a YAML file or the name of a shipped one (cyto_edge/train/configs/<name>.yaml). Unknown keys
and wrong types are errors that name the field (`optim.lr: must be a valid number`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cyto_edge.errors import BadInput, format_validation_error

CONFIG_DIR = Path(__file__).parent / "configs"


class _C(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelCfg(_C):
    name: str = "tiny"
    input_size: int | None = Field(None, gt=31)      # None: the builder's default
    kwargs: dict = Field(default_factory=dict)       # builder keyword arguments (width_mult, s_min, ...)
    um_per_px: float | None = Field(None, gt=0)      # scale the model works at; None: the dataset's
    init: Path | None = None                         # weights to start from (a checkpoint or pretrained backbone)


class DataCfg(_C):
    root: Path
    split: str = "train"
    val_fraction: float = Field(0.1, ge=0, lt=1)
    split_seed: int = 0
    mapping: Path | None = None                       # class-mapping file for other taxonomies
    classes: list[str] | None = None                  # expected classes (refused when the data differ)
    um_per_px: float | None = Field(None, gt=0)       # override the dataset's scale
    balance: float = Field(0.5, ge=0)                 # rare-class image oversampling power (0 = uniform)
    max_val_images: int | None = Field(None, gt=0)


class AugCfg(_C):
    flip: bool = True
    rot90: bool = True
    hue: float = Field(6.0, ge=0)
    saturation: float = Field(0.2, ge=0, lt=1)
    value: float = Field(0.15, ge=0, lt=1)
    gamma: float = Field(0.15, ge=0, lt=1)
    blur_p: float = Field(0.2, ge=0, le=1)
    noise_p: float = Field(0.2, ge=0, le=1)
    scale: tuple[float, float] = (0.9, 1.1)
    pos_fraction: float = Field(0.6, ge=0, le=1)
    min_visible: float = Field(0.5, gt=0, le=1)


class OptimCfg(_C):
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(16, gt=0)
    grad_clip: float | None = Field(10.0, gt=0)
    warmup_steps: int = Field(50, ge=0)
    ema_decay: float | None = Field(0.99, gt=0, lt=1)
    amp: bool = True                                   # CUDA only


class ScheduleCfg(_C):
    epochs: int = Field(10, gt=0)
    steps_per_epoch: int = Field(100, gt=0)
    eval_every: int = Field(1, gt=0)                   # epochs


class LossCfg(_C):
    iou_threshold: float = Field(0.5, gt=0, lt=1)
    neg_pos_ratio: int = Field(3, gt=0)
    alpha: float = Field(1.0, gt=0)
    min_negatives: int = Field(16, ge=0)


class EvalCfg(_C):
    score_threshold: float = Field(0.05, ge=0, le=1)   # low: AP needs the whole PR curve
    nms_iou: float = Field(0.45, gt=0, le=1)
    max_detections: int = Field(300, gt=0)
    tile_overlap: int = Field(160, ge=0)               # >= the largest object, at the model's scale
    batch_size: int = Field(8, gt=0)


class DistillCfg(_C):
    """Local distillation (LD-WSCCD eq. 8-14); see train/losses/distill.py."""

    teacher: Path | None = None
    temperature: float = Field(0.5, gt=0)
    alpha: float = Field(1e-3, ge=0)                   # foreground feature loss weight
    beta: float = Field(5e-4, ge=0)                    # background feature loss weight
    gamma: float = Field(1e-3, ge=0)                   # attention loss weight
    weight: float = Field(1.0, ge=0)                   # overall L_dis weight
    levels: list[int] | None = None                    # student levels to distil (None: all matched)


class MilCfg(_C):
    """MIL detector with OICR refinement (LD-WSCCD eq. 15-16); see train/mil.py and train/losses/mil.py."""

    refine_stages: int = Field(3, ge=0)
    cls_weight: float = Field(1.0, ge=0)
    ref_weight: float = Field(1.0, ge=0)
    proposals: int = Field(300, gt=0)                  # SSD top-K priors per crop (and per exported tile)
    roi_size: int = Field(7, gt=0)
    hidden: int = Field(256, gt=0)
    rescore: float = Field(0.5, ge=0, le=1)            # weight of the MIL score in re-scoring at inference
    pseudo_threshold: float = Field(0.5, ge=0, le=1)
    level: int = Field(1, ge=0)                        # student feature level of the RoI features
    reduce: int = Field(64, ge=0)                      # 1x1 conv channels before RoIAlign (0: none)
    iou_threshold: float = Field(0.5, gt=0, lt=1)      # OICR: IoU with a seed to take its class
    proposal_source: Literal["auto", "ssd", "priors"] = "auto"  # auto: ssd with boxed images, else priors
    prior_min_stride: int = Field(16, gt=0)            # image-level-only proposals: priors of these levels
    weak_bags: int = Field(1, ge=0)                    # whole weak fields per step (one bag each)
    bag_proposals: int = Field(1500, gt=0)             # proposals per weak field (random subset beyond)
    bag_max_side: int = Field(2048, gt=31)             # larger fields go through in windows, one bag
    pseudo_start: float = Field(0.3, ge=0, le=1)       # fraction of training before weak crops get pseudo-boxes
    pseudo_weight: float = Field(1.0, ge=0)


class TrainConfig(_C):
    name: str = "run"
    seed: int = 0
    device: str = "auto"                               # auto | cpu | cuda | cuda:N
    workers: int = Field(1, ge=0)
    threads: int | None = Field(None, gt=0)            # torch CPU threads (None: torch's default)
    out_dir: Path = Path("runs")
    tensorboard: bool = True
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg
    aug: AugCfg = Field(default_factory=AugCfg)
    optim: OptimCfg = Field(default_factory=OptimCfg)
    schedule: ScheduleCfg = Field(default_factory=ScheduleCfg)
    loss: LossCfg = Field(default_factory=LossCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)
    distill: DistillCfg | None = None
    mil: MilCfg | None = None

    @property
    def total_steps(self) -> int:
        return self.schedule.epochs * self.schedule.steps_per_epoch


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _set_path(d: dict, dotted: str, value, source: str) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise BadInput(f"{source}: --set {dotted}: {k} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(items: list[str] | None) -> list[tuple[str, object]]:
    out = []
    for it in items or []:
        key, sep, raw = it.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--set {it!r}: expected key=value, e.g. --set optim.lr=1e-3")
        try:
            val = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            val = raw
        out.append((key.strip(), val))
    return out


def load_config(recipe: str | Path, overrides: list[str] | None = None, base: dict | None = None) -> TrainConfig:
    """A recipe path or shipped name, plus `key=value` overrides -> validated TrainConfig."""
    p = Path(recipe)
    if not p.exists():
        named = CONFIG_DIR / f"{recipe}.yaml"
        if named.exists():
            p = named
        elif base is None:
            raise BadInput(f"{recipe}: no such file and no shipped recipe of that name "
                           f"(shipped: {', '.join(shipped_recipes())})")
    d: dict = dict(base or {})
    if p.exists():
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise BadInput(f"{p}:{where}: malformed YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(loaded, dict):
            raise BadInput(f"{p}: a training recipe must be a YAML mapping")
        d.update(loaded)
    for key, val in parse_overrides(overrides):
        _set_path(d, key, val, str(p))
    try:
        return TrainConfig.model_validate(d)
    except ValidationError as e:
        raise BadInput(format_validation_error(e, str(p))) from None


def config_to_dict(cfg: TrainConfig) -> dict:
    return cfg.model_dump(mode="json")
