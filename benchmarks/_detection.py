"""Shared by ablation.py, distillation.py and distill_sweep.py: cached synthetic data, recipe training with
schedule-only overrides, a cached teacher, evaluation of an exported fp32 bundle through the runtime, model
size, the ms of one tile, and the per-epoch loss terms of a run.

Only the schedule (steps, epochs), the data, the seed and housekeeping (threads, output, no TensorBoard)
are overridden: the learning recipe itself is the shipped one, so the benchmarks follow it when it changes.
"""
from __future__ import annotations

import contextlib
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
from _cache import cached, canonical
from _common import timer

NOISE = {"drop": 0.3, "jitter": 0.1, "weak_fraction": 0.3}
LOSS_TERMS = ("multibox", "ld_fea", "ld_att")


# ------------------------------------------------------------------------------------------ data

def noisy_synth(st: dict) -> Path:
    """The ablation's `cyto-edge synth` set: noisy, incomplete train labels (NOISE), clean test split."""
    key = {"what": "ablation_synth", "images": st["images"], "size": st["size"], "seed": 0,
           "test_fraction": st["test_fraction"], **NOISE}

    def build(d: Path) -> None:
        from cyto_edge.cli import main

        with contextlib.redirect_stdout(sys.stderr):   # stdout carries only the result lines
            rc = main(["synth", str(d / "synth"), "--images", str(st["images"]), "--size", str(st["size"]),
                       "--seed", "0", "--test-fraction", str(st["test_fraction"]), "--no-slide", "--json",
                       "--weak-fraction", str(NOISE["weak_fraction"]),
                       "--label-noise", f"drop={NOISE['drop']},jitter={NOISE['jitter']}"])
        if rc:
            raise SystemExit(f"cyto-edge synth failed with exit code {rc}")

    return cached(key, build, kind="data") / "synth"


def clean_synth(st: dict) -> Path:
    """A `cyto-edge synth` set with exact labels in both splits (seed 0, 1 µm/px), shared by key."""
    from _multicell import synth_dir

    with contextlib.redirect_stdout(sys.stderr):       # the synth summary (on a cache miss) is not a result
        return synth_dir(st["images"], st["size"], seed=0, um_per_px=1.0, test_fraction=st["test_fraction"])


# -------------------------------------------------------------------------------------- training

def overrides(recipe: str, data: Path, seed: int, scale: float, threads: int, out: Path, teacher: Path | None,
              epochs: int | None = 1) -> tuple[list[str], int]:
    """--set overrides: data, seed, no validation split, the recipe's total steps x `scale` spread over
    `epochs` epochs (1: one epoch of every step; None: the recipe's own epoch count). (sets, total steps)."""
    from cyto_edge.train.config import load_config

    base = load_config(recipe, [f"data.root={data}"])
    n_epochs = epochs or base.schedule.epochs
    spe = max(1, round(max(1, round(base.total_steps * scale)) / n_epochs))
    sets = [f"data.root={data}", "data.val_fraction=0", f"seed={seed}", f"schedule.epochs={n_epochs}",
            f"schedule.steps_per_epoch={spe}", f"threads={threads}", "workers=0", "tensorboard=false",
            f"out_dir={out}", f"name={recipe}-{seed}"]
    if teacher is not None:
        sets.append(f"distill.teacher={teacher}")
    return sets, n_epochs * spe


def train(recipe: str, sets: list[str]) -> tuple[Path, float]:
    """Train (or distil, when the sets name a teacher) in-process: (last checkpoint, seconds)."""
    from cyto_edge.train.components import build_components
    from cyto_edge.train.config import load_config
    from cyto_edge.train.loop import Trainer

    cfg = load_config(recipe, sets)
    t0 = time.monotonic()
    res = Trainer(cfg, components=build_components(cfg)).run()
    return Path(res["last"]), time.monotonic() - t0


def command(recipe: str, sets: list[str], distill: bool) -> str:
    return f"cyto-edge {'distill' if distill else 'train'} {recipe} " + " ".join(f"--set {s}" for s in sets)


def cached_train(recipe: str, sets: list[str], teacher: Path | None = None) -> tuple[Path, float, str, Path]:
    """`train` through the benchmark cache: a run already finished with the same recipe text, overrides
    (out_dir aside), teacher file and source is not trained again, so a benchmark stopped part-way (or
    killed) continues where it stopped. (last checkpoint, seconds, command, run directory with metrics.csv)."""
    from cyto_edge.runtime.bundle import sha256_file
    from cyto_edge.train.config import CONFIG_DIR

    own = [s for s in sets if not s.startswith("out_dir=")]
    # The thread count changes how fast a run trains, not what it learns: runs trained with other threads
    # (e.g. two 1-thread runs side by side) serve a later call with --threads 2.
    key = {"what": "bench_run", "recipe": (CONFIG_DIR / f"{recipe}.yaml").read_text(),
           "sets": [s for s in own if not s.startswith("threads=")],
           "teacher": sha256_file(teacher) if teacher is not None else None}

    def build(d: Path) -> None:
        _, secs = train(recipe, own + [f"out_dir={d / 'runs'}"])
        (d / "train_seconds.txt").write_text(f"{secs:.1f}")
        (d / "command.txt").write_text(command(recipe, own, teacher is not None))

    d = cached(key, build)
    run = next(iter(sorted((d / "runs").glob("*/last.pt")))).parent
    return run / "last.pt", float((d / "train_seconds.txt").read_text()), (d / "command.txt").read_text(), run


def teacher_checkpoint(data: Path, st: dict, threads: int, seed: int = 0, tag: str = "bench") -> Path:
    """A `teacher_cpu` checkpoint (one epoch of the recipe's steps x st["step_scale"]), cached by recipe text,
    data, step scale and seed, so every benchmark asking for the same teacher shares one. The key keeps the
    name it had when only the ablation used it, so existing cache entries stay valid."""
    from cyto_edge.train.config import CONFIG_DIR

    scale = st["step_scale"]
    key = {"what": "ablation_teacher", "recipe": (CONFIG_DIR / "teacher_cpu.yaml").read_text(), "data": str(data),
           "step_scale": scale, "seed": seed}

    def build(d: Path) -> None:
        sets, _ = overrides("teacher_cpu", data, seed, scale, threads, d / "runs", None)
        last, secs = train("teacher_cpu", sets)
        (d / "teacher.pt").write_bytes(last.read_bytes())
        (d / "train_seconds.txt").write_text(f"{secs:.1f}")
        (d / "command.txt").write_text(command("teacher_cpu", sets, False))

    print(f"[{tag}] teacher: cache key {canonical({k: v for k, v in key.items() if k != 'recipe'})}", file=sys.stderr)
    return cached(key, build) / "teacher.pt"


def teacher_run_dir(teacher: Path) -> Path | None:
    """The run directory (metrics.csv) of a teacher: its own directory (a `cyto-edge train` run) or the one
    kept beside a cached teacher; None when there is none."""
    if (teacher.parent / "metrics.csv").is_file():
        return teacher.parent
    found = sorted((teacher.parent / "runs").glob("*/metrics.csv"))
    return found[0].parent if found else None


# ------------------------------------------------------------------------------------ evaluation

def evaluate(ckpt: Path, data: Path, threads: int, out: Path) -> dict:
    """Export an fp32 bundle and evaluate it on the clean test split through the runtime. A bundle with a
    MIL output is evaluated twice: as exported, and with its re-scoring weight set to 0 (a copy), which
    separates what re-scoring adds from what the MIL losses and pseudo-boxes did to the SSD itself."""
    import shutil

    from cyto_edge.export.bundle_writer import export_fp32_bundle
    from cyto_edge.runtime.bundle import Bundle
    from cyto_edge.runtime.evaluate import evaluate_bundle_cli

    bundle = export_fp32_bundle(ckpt, out / f"{ckpt.parent.name}.cytobundle")
    r = evaluate_bundle_cli(bundle, data, split="test", level="box", engine="onnxruntime", threads=threads)
    res = {"map50": float(r.get("map50") or 0.0), "map": float(r.get("map") or 0.0), "bundle": str(bundle)}
    b = Bundle.open(bundle)
    if b.manifest.output.mil is not None:
        plain = Path(shutil.copytree(bundle, out / f"{ckpt.parent.name}.no_rescore.cytobundle", dirs_exist_ok=True))
        bp = Bundle.open(plain)
        bp.manifest.output.mil.weight = 0.0
        bp.save()
        r0 = evaluate_bundle_cli(plain, data, split="test", level="box", engine="onnxruntime", threads=threads)
        res["map50_no_rescore"] = float(r0.get("map50") or 0.0)
    return res


def model_size(ckpt: Path) -> dict:
    """{"params", "params_m", "gflops", "input_size"} of the deployed detector (batch 1, its input size)."""
    from cyto_edge.train.checkpoint import load_checkpoint, model_from_checkpoint
    from cyto_edge.train.models.detector import model_info

    info = model_info(model_from_checkpoint(load_checkpoint(ckpt)))
    return {k: info[k] for k in ("params", "params_m", "gflops", "input_size")}


def tile_ms(bundles: dict[str, Path], data: Path, threads: int, rounds: int = 3, iters: int = 30) -> dict[str, float]:
    """{name: ms}: ONNX Runtime fp32 `infer` of ONE preprocessed model-input tile (batch 1, S x S, a real
    test-split tile), p50 of `iters` calls, rounds interleaved across the bundles, best round kept.
    Excludes reading the image, tiling, normalisation and decoding."""
    from cyto_edge.export.calibration import calibration_tiles
    from cyto_edge.runtime.bundle import Bundle
    from cyto_edge.runtime.engines import load_engine
    from cyto_edge.train.data import load_detection

    opened = {k: Bundle.open(p) for k, p in bundles.items()}
    engines = {k: load_engine(b, "onnxruntime", precision="fp32", threads=threads) for k, b in opened.items()}
    tiles = {k: calibration_tiles(load_detection(data, "test"), b.manifest, 1, seed=1) for k, b in opened.items()}
    best: dict[str, float] = {}
    try:
        for _ in range(rounds):
            for k, eng in engines.items():
                t = timer(lambda: eng.infer(tiles[k]), warmup=3, iters=iters)
                best[k] = min(best.get(k, np.inf), t.p50_ms)
    finally:
        for eng in engines.values():
            eng.close()
    return {k: round(v, 3) for k, v in best.items()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------- figures, losses

def mean_std(v: list[float], ddof: int = 0) -> dict:
    a = np.asarray(v, np.float64)
    std = float(a.std(ddof=ddof)) if len(a) > ddof else None
    return {"mean": round(float(a.mean()), 4), "std": None if std is None else round(std, 4),
            "per_seed": [round(float(x), 4) for x in a]}


def loss_terms(run_dir: Path) -> list[dict]:
    """Per epoch, from the run's metrics.csv: {"epoch", "multibox", "ld_fea", "ld_att", "ld_over_multibox"}
    (means over the epoch's steps; the LD terms as added to the total, i.e. after distill.weight; absent
    terms are omitted)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    out = []
    with open(path) as fh:
        for row in csv.DictReader(fh):
            if not row.get("epoch") or not row.get("train_multibox"):
                continue
            rec: dict = {"epoch": int(float(row["epoch"]))}
            for term in LOSS_TERMS:
                val = row.get(f"train_{term}")
                if val not in (None, ""):
                    rec[term] = round(float(val), 6)
            if "ld_fea" in rec or "ld_att" in rec:
                ld = rec.get("ld_fea", 0.0) + rec.get("ld_att", 0.0)
                rec["ld_over_multibox"] = round(ld / rec["multibox"], 6) if rec["multibox"] else None
            out.append(rec)
    return out


def mean_loss_terms(per_seed: list[list[dict]]) -> dict:
    """Per-epoch loss terms averaged over seeds: {"epoch": [...], "multibox": [...], ...} (lists by epoch)."""
    per_seed = [s for s in per_seed if s]
    if not per_seed:
        return {}
    n = min(len(s) for s in per_seed)
    keys = [k for k in (*LOSS_TERMS, "ld_over_multibox") if all(k in s[0] for s in per_seed)]
    out: dict = {"epoch": [per_seed[0][i]["epoch"] for i in range(n)]}
    for k in keys:
        vals = [[s[i][k] for s in per_seed] for i in range(n)]
        out[k] = [None if any(v is None for v in vs) else round(float(np.mean(vs)), 6) for vs in vals]
    return out


def ratio_range(terms: dict) -> dict | None:
    """{"first", "last", "min", "max"} of the per-epoch ld/multibox ratio, or None without LD terms."""
    r = [x for x in terms.get("ld_over_multibox", []) if x is not None]
    if not r:
        return None
    return {"first": r[0], "last": r[-1], "min": min(r), "max": max(r)}
