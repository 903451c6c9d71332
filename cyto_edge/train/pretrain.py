"""Self-supervised jigsaw pretraining on a folder of unlabeled frames, and loading its weights elsewhere.

Input: any folder of frames, searched recursively (.jpg/.jpeg/.png/.bmp/.tif/.tiff); a folder of frames
stored by the daemon is valid input. Overlays written by `cyto-edge explain` (`*.explain.png`) are not
frames and are ignored. Files that cannot be read are skipped and counted, never fatal. Images smaller
than the jigsaw grid (3 x cell px on each side) are refused, each with a message naming the file and
the minimum size; the run fails only when no usable image is left.

Puzzles (Noroozi & Favaro 2016, section 3.2-3.3, at the frame's own scale; never a resize, so the trunk
learns at the µm/px the detector will see): a random (3 cell)^2 crop, cut into a 3x3 grid of cells; from
each cell a tile of `tile` px at a random offset (the gap of cell - tile px and the jitter keep edges
and lines from lining up across tiles); each colour channel shifted by up to +-2 px (chromatic
aberration); the puzzle turned gray with p = 0.3; every tile normalised per channel to zero mean and
unit variance (removes brightness, colour and illumination-gradient cues between tiles). The tiles
are shuffled by one of the `num_perms` permutations; the network predicts which.

The output file (`--out pretrained.pt`) holds the trunk's weights under the names they carry inside
the target model ("backbone.*" for a detector, "stem.*"/"stages.*" for a models/rcan.py classifier),
the permutation set and the run's figures. How other models take them (`--init pretrained.pt`):

- detectors: `cyto-edge train RECIPE --set model.init=pretrained.pt` (the train loop loads every tensor
  whose name and shape match and prints "initialised N/M tensors"); pretrain with `--arch` set to the
  recipe's model name and `--arch-kw` set to its builder kwargs, so that all backbone tensors match;
- anything else (a classifier, the patch-attention classifier, a grader with an image trunk): call

      from cyto_edge.train.pretrain import load_pretrained_backbone
      matched, missing = load_pretrained_backbone(model, "pretrained.pt")

  after building the model and before creating the optimiser, and report len(matched); it also matches
  names that differ by a leading prefix (`backbone.`, `trunk.body.`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch import nn

from cyto_edge.errors import BadInput
from cyto_edge.train.models.jigsaw import NUM_TILES, JigsawNet, build_trunk, hamming_permutations, permutation_stats

FORMAT = "cyto-edge-pretrained"
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------- scan

@dataclass
class FrameScan:
    usable: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    too_small: list[tuple[Path, int, int]] = field(default_factory=list)   # (file, width, height)
    min_side: int = 0

    def too_small_message(self, path: Path, w: int, h: int) -> str:
        return (f"{path}: {w}x{h} px is smaller than the jigsaw grid; images need at least "
                f"{self.min_side}x{self.min_side} px (3 cells of --cell px)")

    def summary(self) -> dict:
        return {"usable": len(self.usable), "unreadable": len(self.unreadable), "too_small": len(self.too_small),
                "min_side": self.min_side}


def scan_frames(root: str | Path, min_side: int) -> FrameScan:
    """Every frame file under `root`, sorted, split into usable / unreadable / too small (header reads)."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"{root}: --unlabeled must be a folder of frames")
    scan = FrameScan(min_side=min_side)
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in FRAME_SUFFIXES or p.name.endswith(".explain.png"):
            continue
        try:
            with Image.open(p) as im:
                w, h = im.size
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            scan.unreadable.append((p, type(e).__name__))
            continue
        if min(w, h) < min_side:
            scan.too_small.append((p, w, h))
        else:
            scan.usable.append(p)
    return scan


# -------------------------------------------------------------------------------------- puzzles

@dataclass
class PuzzleSpec:
    cell: int = 64             # px of each grid cell; the crop is 3 * cell
    tile: int = 56             # px of the tile cut from each cell (gap + jitter = cell - tile)
    channel_jitter: int = 2    # px, per colour channel
    gray_p: float = 0.3

    def __post_init__(self):
        if not 8 <= self.tile <= self.cell:
            raise BadInput(f"--tile must be in [8, --cell={self.cell}], got {self.tile}")

    @property
    def crop(self) -> int:
        return 3 * self.cell


def cut_puzzle(rgb: np.ndarray, perm: np.ndarray, spec: PuzzleSpec, rng: np.random.Generator) -> np.ndarray:
    """One puzzle from an (H, W, 3) uint8 RGB frame -> (9, 3, tile, tile) float32 tiles in permuted order:
    input position i holds the tile of grid cell perm[i]."""
    H, W = rgb.shape[:2]
    S, c, t, j = spec.crop, spec.cell, spec.tile, spec.channel_jitter
    y0, x0 = int(rng.integers(0, H - S + 1)), int(rng.integers(0, W - S + 1))
    gray = rng.random() < spec.gray_p
    tiles = np.empty((NUM_TILES, 3, t, t), np.float32)
    for k in range(NUM_TILES):
        r, q = divmod(k, 3)
        ty = y0 + r * c + int(rng.integers(0, c - t + 1))
        tx = x0 + q * c + int(rng.integers(0, c - t + 1))
        for ch in range(3):
            dy, dx = (int(v) for v in rng.integers(-j, j + 1, 2)) if j else (0, 0)
            yy, xx = int(np.clip(ty + dy, 0, H - t)), int(np.clip(tx + dx, 0, W - t))
            tiles[k, ch] = rgb[yy:yy + t, xx:xx + t, ch]
        if gray:
            tiles[k] = tiles[k].mean(0, keepdims=True)
    m = tiles.mean(axis=(2, 3), keepdims=True)
    s = tiles.std(axis=(2, 3), keepdims=True)
    tiles = (tiles - m) / np.where(s < 1e-3, 1.0, s)    # per tile, per channel
    return tiles[perm]


class PuzzleStream:
    """Batches of (tiles (B, 9, 3, t, t), perm index (B,)) from frame files; each frame read once per
    epoch and cut into `per_image` puzzles; files that fail to decode are dropped and counted."""

    def __init__(self, files: list[Path], perms: np.ndarray, spec: PuzzleSpec, per_image: int, seed: int):
        self.files, self.perms, self.spec, self.per_image = list(files), perms, spec, per_image
        self.rng = np.random.default_rng(seed)
        self.failed: list[Path] = []

    def _read(self, p: Path) -> np.ndarray | None:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None or min(img.shape[:2]) < self.spec.crop:
            self.failed.append(p)
            return None
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def epoch(self, batch_size: int):
        order = self.rng.permutation(len(self.files))
        buf_x, buf_y = [], []
        for i in order:
            rgb = self._read(self.files[i])
            if rgb is None:
                continue
            for _ in range(self.per_image):
                k = int(self.rng.integers(len(self.perms)))
                buf_x.append(cut_puzzle(rgb, self.perms[k], self.spec, self.rng))
                buf_y.append(k)
            while len(buf_x) >= batch_size * 2:      # a little shuffling across frames
                yield self._pop(buf_x, buf_y, batch_size)
        while buf_x:
            yield self._pop(buf_x, buf_y, batch_size)
        bad = set(self.failed)
        self.files = [f for f in self.files if f not in bad]

    def _pop(self, bx: list, by: list, n: int):
        idx = sorted(self.rng.choice(len(bx), size=min(n, len(bx)), replace=False).tolist(), reverse=True)
        x = np.stack([bx.pop(i) for i in idx])
        y = np.asarray([by.pop(i) for i in idx], np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)


# ------------------------------------------------------------------------------------- training

@dataclass
class PretrainConfig:
    arch: str = "rcan"
    trunk_kwargs: dict = field(default_factory=dict)   # e.g. {"widths": [16, 32, 64]} for a classifier trunk
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    num_perms: int = 100
    criterion: str = "minimum"
    per_image: int = 8
    seed: int = 0
    puzzle: PuzzleSpec = field(default_factory=PuzzleSpec)
    time_budget_s: float | None = None


def _lr(peak: float, done: float) -> float:
    """Linear warm-up over the first 5% of the run, then cosine decay to zero (`done` in [0, 1])."""
    return peak * min(1.0, done / 0.05 + 1e-3) * 0.5 * (1 + math.cos(math.pi * done))


def pretrain(files: list[Path], cfg: PretrainConfig, progress=None) -> tuple[JigsawNet, dict]:
    """Train a JigsawNet over the frames for `epochs`, or until `time_budget_s` is spent (whichever comes
    first; the warm-up + cosine schedule follows whichever is further along)."""
    torch.manual_seed(cfg.seed)
    perms = hamming_permutations(cfg.num_perms, cfg.seed, cfg.criterion)
    net = JigsawNet(build_trunk(cfg.arch, **cfg.trunk_kwargs), cfg.num_perms)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stream = PuzzleStream(files, perms, cfg.puzzle, cfg.per_image, cfg.seed)
    total = max(1, cfg.epochs * math.ceil(len(files) * cfg.per_image / cfg.batch_size))
    history, t0, step = [], time.monotonic(), 0
    for ep in range(cfg.epochs):
        net.train()
        loss_sum = correct = seen = 0
        for x, y in stream.epoch(cfg.batch_size):
            done = max(step / total, (time.monotonic() - t0) / cfg.time_budget_s if cfg.time_budget_s else 0.0)
            for g in opt.param_groups:
                g["lr"] = _lr(cfg.lr, min(done, 1.0))
            logits = net(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            opt.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if progress:
                progress(ep, seen)
            if cfg.time_budget_s and time.monotonic() - t0 > cfg.time_budget_s:
                break
        if seen == 0:
            raise BadInput("no frame could be decoded; nothing to pretrain on")
        history.append({"epoch": ep + 1, "loss": round(loss_sum / seen, 4), "accuracy": round(correct / seen, 4)})
        if cfg.time_budget_s and time.monotonic() - t0 > cfg.time_budget_s:
            break
    stats = {"history": history, "permutations": permutation_stats(perms), "chance": round(1 / cfg.num_perms, 4),
             "seconds": round(time.monotonic() - t0, 1), "decode_failures": [str(p) for p in stream.failed]}
    return net, stats


@torch.no_grad()
def jigsaw_accuracy(net: JigsawNet, files: list[Path], spec: PuzzleSpec, perms: np.ndarray, n: int = 256,
                    seed: int = 1) -> float:
    """Accuracy on `n` fresh puzzles (new crops, jitter and permutations) from `files`."""
    net.eval()
    stream = PuzzleStream(files, perms, spec, per_image=max(1, n // max(1, len(files))), seed=seed)
    correct = seen = 0
    for x, y in stream.epoch(64):
        correct += int((net(x).argmax(1) == y).sum())
        seen += len(y)
        if seen >= n:
            break
    return correct / max(seen, 1)


def save_pretrained(path: str | Path, net: JigsawNet, cfg: PretrainConfig, stats: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    perms = hamming_permutations(cfg.num_perms, cfg.seed, cfg.criterion)
    ckpt = {"format": FORMAT, "version": 1, "arch": cfg.arch, "trunk_kwargs": cfg.trunk_kwargs,
            "prefix": net.trunk.prefix,
            "state_dict": net.trunk.target_state_dict(),
            "jigsaw_head": {k: v for k, v in net.state_dict().items() if not k.startswith("trunk.")},
            "permutations": perms, "puzzle": vars(cfg.puzzle), "stats": stats}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------ transfer

class BackboneLoad(NamedTuple):
    matched: list[str]   # keys of the target model that received pretrained weights
    missing: list[str]   # pretrained tensors with no target of the same name (or unique suffix) and shape


def _read_pretrained(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{p}: no such pretrained-weights file (--init); make one with `cyto-edge pretrain`")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file
        raise BadInput(f"{p}: not a readable torch file ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise BadInput(f"{p}: no 'state_dict' in the file; --init wants the output of `cyto-edge pretrain`")
    return ckpt


def _suffixes(key: str) -> list[str]:
    """`key` without 0, 1, ... of its leading attribute names (`backbone.`, `trunk.body.`): never past a
    numeric index, so `stages.1.conv.weight` cannot land on `stages.0.1.conv.weight`."""
    parts = key.split(".")
    out = []
    for i in range(len(parts) - 1):
        if parts[i].isdigit():
            break
        out.append(".".join(parts[i:]))
    return out


def load_pretrained_backbone(module: nn.Module, path: str | Path) -> BackboneLoad:
    """Copy pretrained trunk weights into `module` by name and shape. A name matches a target that is the
    same, or the same after leading attribute prefixes are added or removed (`backbone.`, `trunk.body.`),
    when exactly one target of that shape qualifies; ambiguous names are left out (reported missing).
    BatchNorm's `num_batches_tracked` counters are not weights and are neither loaded nor counted."""
    src = {k: v for k, v in _read_pretrained(path)["state_dict"].items() if not k.endswith("num_batches_tracked")}
    target = module.state_dict()
    taken: dict[str, torch.Tensor] = {}
    missing = []
    for k, v in src.items():
        hit = None
        for suffix in _suffixes(k):
            cands = [t for t in target if t not in taken and target[t].shape == v.shape
                     and (t == suffix or t.endswith("." + suffix))]
            if suffix == k and k in cands:
                cands = [k]
            if len(cands) == 1:
                hit = cands[0]
            if cands:
                break
        if hit is None:
            missing.append(k)
        else:
            taken[hit] = v
    module.load_state_dict(taken, strict=False)
    return BackboneLoad(sorted(taken), missing)
