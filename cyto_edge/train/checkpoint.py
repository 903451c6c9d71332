"""Checkpoints: written atomically, self-describing (model spec, classes, scale, priors, provenance).

Layout of a checkpoint dict (torch.save):
    format            "cyto-edge-ckpt/1"
    model             ModelSpec as a dict (name, num_classes, input_size, kwargs) -> models.detector.rebuild
    state_dict        the trained weights; ema_state_dict the EMA weights (preferred for export / eval)
    classes, bethesda, organisms, um_per_px, normalization {mean, std, scale, color}
    priors (P, 4) float32, variances, prior_spec
    config (the TrainConfig as a dict), dataset_fingerprint, git_revision, versions
    step, epoch, best_map50, history, optimizer, ema_updates, rng
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from cyto_edge.errors import BadInput

FORMAT = "cyto-edge-ckpt/1"


def save_checkpoint(path: Path, state: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": FORMAT, **state}, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{p}: no such checkpoint")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a corrupt file is bad input, not a crash
        raise BadInput(f"{p}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise BadInput(f"{p}: not a cyto-edge detector checkpoint (format {ck.get('format') if isinstance(ck, dict) else '?'!r})")
    return ck


def model_from_checkpoint(ck: dict, ema: bool = True):
    """The detector of a checkpoint in eval mode (EMA weights when present and `ema`)."""
    from cyto_edge.train.models.detector import rebuild

    model = rebuild(ck["model"])
    sd = ck.get("ema_state_dict") if ema and ck.get("ema_state_dict") else ck["state_dict"]
    model.load_state_dict(sd)
    return model.eval()


#: Entries of a training checkpoint that only `--resume` reads.
RESUME_ONLY = ("optimizer", "ema_state_dict", "ema_updates", "rng")


def slim_checkpoint(ck: dict, half: bool = True) -> dict:
    """The checkpoint to publish: the weights evaluation, export and distillation use (the EMA weights when
    there are any) as `state_dict`, without the optimizer state and the second copy of the weights that only
    `--resume` needs; floating-point tensors in fp16 with `half` (loading copies them into the fp32 model, so
    the model is the fp32 one up to fp16 rounding of its weights). Everything else (spec, classes, scale,
    priors, config, history, provenance) is kept. A slim checkpoint cannot be resumed."""
    sd = ck.get("ema_state_dict") or ck["state_dict"]
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    out = {k: v for k, v in ck.items() if k not in RESUME_ONLY}
    out["state_dict"] = sd
    out["slim"] = {"weights": "ema" if ck.get("ema_state_dict") else "trained",
                   "dtype": "float16" if half else "float32"}
    return out
