"""Local distillation (LD-WSCCD eq. 8-14): the CPU student alone vs the student + LD vs the teacher.

Data: a cached `cyto-edge synth` set with exact labels (--labels noisy: the ablation's set instead, whose
teacher is then shared with benchmarks/ablation.py when the step scale matches); the test split is clean.
Rows, each over --seeds (default 0,1,2), trained from the shipped recipes with only the schedule length,
the data and the seed overridden (no validation split; the last checkpoint):
- student   `cyto-edge train student_cpu`
- +LD       `cyto-edge distill student_ld --teacher T`     T: the seed-0 teacher
- teacher   `cyto-edge train teacher_cpu`                  cached per seed (benchmarks/_cache.py)
Students keep their recipe's epochs with steps_per_epoch x step scale; the teacher takes the same total
steps in one epoch (the same schedule, the learning rate depends on the step only; the cache entry the
ablation uses). Every checkpoint is exported to an fp32 bundle and evaluated through the runtime (ONNX
Runtime, tiled as on the device) on the clean test split.

Figures per row: mAP@0.5 and mAP@[.5:.95], mean and sample std (ddof 1) over seeds; params and GFLOPs of
the deployed detector (batch 1, 320² input); CPU ms per tile: ONNX Runtime fp32 `infer` of one
preprocessed 320² test tile at batch 1 with --threads threads (p50, rounds interleaved across the rows'
seed-0 bundles, best round; reading, tiling, normalisation and decoding excluded); per epoch, the mean of
each loss term (multibox, ld_fea, ld_att: the trainer's metrics.csv) and the ratio (ld_fea+ld_att)/multibox.
Summary line: the LD gain in mAP@0.5 points, gain / pooled sample std, the LD student's fraction of the
teacher's mAP@0.5, the GFLOPs ratio, and each target: gain >= 2 points, gain > 2 std, >= 90% of the
teacher's mAP, <= 1/8 of its GFLOPs. They count only when the teacher reaches mAP@0.5 >= 0.5
(`teacher_learned`).

Setting: full: 400 fields of 512 px, the recipes' steps (hours on 2 cores); --small: 100 fields, 4% of the
steps (~20-24), teacher seed 0 only: ~15 min on 2 idle cores, for the wiring and the loss-term magnitudes;
a teacher this short does not learn, so its targets do not count (teacher_learned: false).

A teacher trained beforehand (the README's CPU recipes: `cyto-edge train teacher_cpu --set data.root=DATA
--set schedule.epochs=34`) and its data replace the setting's own:

    python benchmarks/distillation.py --teacher runs/teacher_cpu/best.pt --data DATA --epochs 40

students then train `--epochs` epochs of their recipe's steps per epoch on DATA's train split, and every
row is evaluated on DATA's test split (the teacher row is that checkpoint, one "seed"). Every finished
student run is cached (benchmarks/_cache.py: recipe, overrides, teacher file, source), so a run stopped
part-way continues where it stopped when started again with the same arguments.
"""
from __future__ import annotations

import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import emit, parser
from _detection import (NOISE, cached_train, clean_synth, evaluate, load_average, loss_terms, mean_loss_terms, mean_std,
                        model_size, noisy_synth, overrides, ratio_range, teacher_checkpoint, teacher_run_dir, tile_ms)

ROWS = {"student": "student_cpu", "+LD": "student_ld", "teacher": "teacher_cpu"}
TEACHER_MIN_MAP50 = 0.5


def settings(small: bool, smoke: bool = False) -> dict:
    """Data size, steps (x the recipes') and timing effort of a setting. `smoke`: wiring only, no figures."""
    if smoke:
        return dict(images=12, size=512, test_fraction=0.34, step_scale=2 / 600, epochs=2, teacher_seeds=1,
                    rounds=1, iters=5)
    if small:
        return dict(images=100, size=512, test_fraction=0.3, step_scale=0.04, epochs=None, teacher_seeds=1,
                    rounds=2, iters=20)
    return dict(images=400, size=512, test_fraction=0.3, step_scale=1.0, epochs=None, teacher_seeds=None,
                rounds=3, iters=60)


def dataset(st: dict, labels: str) -> Path:
    return noisy_synth(st) if labels == "noisy" else clean_synth(st)


def run_seed(row: str, seed: int, data: Path, st: dict, threads: int, tmp: Path, teacher0: Path | None) -> dict:
    """Train (or fetch the cached teacher), export, evaluate; the per-epoch loss terms of the run."""
    recipe = ROWS[row]
    if row == "teacher" and st.get("given_teacher"):
        ckpt, secs, run_dir = teacher0, None, teacher_run_dir(teacher0)
        cmd = f"given: {teacher0}"
    elif row == "teacher":
        ckpt = teacher0 if seed == 0 else teacher_checkpoint(data, st, threads, seed, tag="distillation")
        secs = float((ckpt.parent / "train_seconds.txt").read_text())
        cmd, run_dir = (ckpt.parent / "command.txt").read_text(), teacher_run_dir(ckpt)
    else:
        distil = row == "+LD"
        sets, _ = overrides(recipe, data, seed, st["step_scale"], threads, tmp / "runs",
                            teacher0 if distil else None, epochs=st["epochs"])
        ckpt, secs, cmd, run_dir = cached_train(recipe, sets, teacher0 if distil else None)
    ev = evaluate(ckpt, data, threads, tmp / "bundles" / row.replace("+", "plus_"))
    took = "given" if secs is None else f"{secs:.0f} s training"
    print(f"[distillation] {row} seed {seed}: mAP@0.5 {ev['map50']:.3f} ({took})", file=sys.stderr, flush=True)
    return {**ev, "seed": seed, "ckpt": str(ckpt), "train_seconds": None if secs is None else round(secs, 1),
            "command": cmd,
            "loss_terms": loss_terms(run_dir) if run_dir else []}


def row_figures(runs: list[dict], size: dict, ms: float | None) -> tuple[dict, dict]:
    """(figures, per-epoch loss terms averaged over seeds) of one row."""
    terms = mean_loss_terms([r["loss_terms"] for r in runs])
    fig = {"map50": mean_std([r["map50"] for r in runs], ddof=1), "map": mean_std([r["map"] for r in runs], ddof=1),
           "params": size["params"], "gflops": size["gflops"], "cpu_ms_per_tile_b1": ms,
           "train_seconds": _mean_seconds([r["train_seconds"] for r in runs])}
    if ratio_range(terms):
        fig["ld_over_multibox"] = ratio_range(terms)
    return fig, terms


def _mean_seconds(secs: list[float | None]) -> float | None:
    known = [s for s in secs if s is not None]
    return round(float(np.mean(known)), 1) if known else None


def summary(maps: dict[str, list[float]], gflops: dict[str, float]) -> dict:
    """The targets' arithmetic. maps: row -> mAP@0.5 per seed (0..1); gflops: row -> GFLOPs."""
    mean = {k: float(np.mean(v)) for k, v in maps.items() if v}
    out: dict = {"map50_mean": {k: round(v, 4) for k, v in mean.items()}}
    s, ld, t = maps.get("student"), maps.get("+LD"), mean.get("teacher")
    gain = pooled = frac = ratio = None
    if s and ld:
        gain = 100 * (mean["+LD"] - mean["student"])
        if len(s) > 1 and len(ld) > 1:
            pooled = 100 * math.sqrt((np.var(s, ddof=1) + np.var(ld, ddof=1)) / 2)
    if ld and t:
        frac = mean["+LD"] / t
    if "+LD" in gflops and "teacher" in gflops:
        ratio = gflops["+LD"] / gflops["teacher"]
    out.update({"ld_gain_points": _r(gain), "pooled_std_points": _r(pooled),
                "ld_gain_over_std": _r(gain / pooled) if gain is not None and pooled else None,
                "ld_fraction_of_teacher": _r(frac), "gflops_ratio": _r(ratio)})
    out["targets"] = {
        "ld_gain_ge_2_points": None if gain is None else gain >= 2.0,
        "ld_gain_gt_2_std": None if gain is None or pooled is None else gain > 2 * pooled,
        "ld_keeps_ge_90pct_of_teacher": None if frac is None else frac >= 0.9,
        "gflops_le_1_8_of_teacher": None if ratio is None else ratio <= 1 / 8}
    out["teacher_learned"] = None if t is None else t >= TEACHER_MIN_MAP50
    out["counted"] = bool(out["teacher_learned"])
    if t is not None and not out["teacher_learned"]:
        out["note"] = (f"the teacher reached mAP@0.5 {t:.3f} < {TEACHER_MIN_MAP50}: the targets do not count "
                       f"(train longer: a larger --step-scale, the full setting, or --teacher with a teacher of the "
                       f"README's CPU recipe)")
    return out


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def given_setting(st: dict, teacher: Path | None, data: Path | None, epochs: int | None) -> dict:
    """The setting with a given teacher, data set and student epochs applied; bad input exits with a
    message naming the argument."""
    st = dict(st)
    if teacher is not None:
        if data is None:
            raise SystemExit("--teacher needs --data: the data set the teacher was trained on (its test split "
                             "scores every row)")
        if not teacher.is_file():
            raise SystemExit(f"--teacher {teacher}: no such checkpoint")
        st["given_teacher"] = str(teacher)
    if data is not None:
        from cyto_edge.errors import BadInput
        from cyto_edge.train.data import load_detection

        try:
            load_detection(data, "test")
            train_fp = load_detection(data, "train").fingerprint()
        except BadInput as e:       # the loader names the file and what is wrong with it
            raise SystemExit(f"--data {data}: no usable test split ({e})") from None
        if teacher is not None:
            check_teacher_data(teacher, data, train_fp)
        st.update(images=None, size=None, test_fraction=None)
    if epochs is not None:
        if epochs < 1:
            raise SystemExit(f"--epochs {epochs}: give at least 1")
        from cyto_edge.train.config import load_config

        recipe_epochs = load_config(ROWS["student"]).schedule.epochs
        st.update(epochs=epochs, step_scale=epochs / recipe_epochs)
    return st


def check_teacher_data(teacher: Path, data: Path, train_fingerprint: str) -> None:
    """A given teacher must have been trained on --data's train split (the fingerprint its checkpoint
    records): a teacher from another set may have learned from the test fields that score every row."""
    from cyto_edge.errors import BadInput
    from cyto_edge.train.checkpoint import load_checkpoint

    try:
        ck = load_checkpoint(teacher)
    except BadInput as e:
        raise SystemExit(f"--teacher {e}") from None
    if ck.get("dataset_fingerprint") != train_fingerprint:
        trained_on = (ck.get("config") or {}).get("data", {}).get("root", "?")
        raise SystemExit(f"--teacher {teacher}: trained on another data set (data.root {trained_on}, fingerprint "
                         f"{ck.get('dataset_fingerprint')}) than --data {data} (train split {train_fingerprint}); "
                         f"give the set it was trained on, or remake it with the command that made it")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2,
                   help="torch and ONNX Runtime threads (training, evaluation, timing).")
    p.add_argument("--step-scale", type=float, default=None,
                   help="Multiply the recipes' steps (default: 1, --small 0.04). Changes the teacher's cache key.")
    p.add_argument("--labels", choices=["clean", "noisy"], default="clean",
                   help="Train labels: exact, or the ablation's noisy set (shares its cached teacher).")
    p.add_argument("--rows", default=",".join(ROWS), help=f"Comma-separated rows (default all: {','.join(ROWS)}).")
    p.add_argument("--teacher", type=Path, default=None, metavar="CKPT",
                   help="A trained teacher_cpu checkpoint: distil from it and report it as the teacher row, "
                        "instead of the teacher the setting trains. Needs --data (the set it was trained on).")
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="Train the students on DIR's train split and evaluate every row on its test split "
                        "(a cyto-edge synth set at 1 µm/px, or a COCO set), instead of the setting's set.")
    p.add_argument("--epochs", type=int, default=None,
                   help="Student epochs, each of the recipe's steps per epoch (e.g. 40 as in the README's "
                        "recipes); default: the recipe's epochs with their steps x the step scale.")
    p.add_argument("--keep", action="store_true", help="Keep the runs and bundles (their directory is printed).")
    p.add_argument("--smoke", action="store_true", help=__import__("argparse").SUPPRESS)   # wiring check, 2 steps
    p.set_defaults(seeds=[0, 1, 2])
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    st = settings(args.small, args.smoke)
    if args.step_scale is not None:
        st["step_scale"] = args.step_scale
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"--rows: unknown {', '.join(sorted(unknown))} (choose from {', '.join(ROWS)})")
    st = given_setting(st, args.teacher, args.data, args.epochs)
    data = args.data or dataset(st, args.labels)
    needs_teacher = bool({"+LD", "teacher"} & set(rows))
    if st.get("given_teacher"):
        teacher0 = args.teacher
    else:
        teacher0 = teacher_checkpoint(data, st, args.threads, 0, tag="distillation") if needs_teacher else None
    tmp = Path(tempfile.mkdtemp(prefix="distillation-"))
    try:
        measure(args, st, rows, data, teacher0, tmp)
    finally:
        if args.keep:
            print(f"[distillation] runs and bundles kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def measure(args, st: dict, rows: list[str], data: Path, teacher0: Path | None, tmp: Path) -> None:
    results: dict[str, list[dict]] = {}
    for row in rows:
        seeds = args.seeds[: st["teacher_seeds"]] if row == "teacher" and st["teacher_seeds"] else args.seeds
        results[row] = [run_seed(row, s, data, st, args.threads, tmp, teacher0) for s in seeds]
    sizes = {row: model_size(Path(rs[0]["ckpt"])) for row, rs in results.items()}
    load_before = load_average()
    ms = tile_ms({row: Path(rs[0]["bundle"]) for row, rs in results.items()}, data, args.threads,
                 rounds=st["rounds"], iters=st["iters"])
    info = {"labels": args.labels, "fields": st["images"], "field_px": st["size"], "test_fraction": st["test_fraction"],
            "step_scale": st["step_scale"], "data": str(data), "teacher": str(teacher0),
            "load_average": {"before_timing": load_before, "after_timing": load_average()},
            "timed": "onnxruntime fp32 infer, one preprocessed 320x320 test tile, batch 1, p50, best round",
            **({"noise": NOISE} if args.labels == "noisy" else {}), **({"smoke": True} if args.smoke else {})}
    for row, rs in results.items():
        fig, terms = row_figures(rs, sizes[row], ms.get(row))
        emit("distillation", fig, torch_threads=args.threads, ort_threads=args.threads, row=row, recipe=ROWS[row],
             seeds=[r["seed"] for r in rs], train_command=rs[0]["command"], loss_terms_per_epoch=terms, **info)
    emit("distillation_summary", summary({r: [x["map50"] for x in rs] for r, rs in results.items()},
                                         {r: s["gflops"] for r, s in sizes.items()}),
         torch_threads=args.threads, ort_threads=args.threads, **info)


if __name__ == "__main__":
    main()
