"""The paper's ablation (LD-WSCCD Table 4) on synthetic data with noisy and incomplete labels.

Data: a fixed `cyto-edge synth` set (cached) whose train split has 30% of its boxes dropped, the rest
jittered by up to 10% of their size, and 30% of its images with image-level labels only; the test split is
clean. Rows, each over the seeds (default 0,1,2), trained from the shipped recipes (no validation split;
the last checkpoint), exported to an fp32 bundle (export/bundle_writer.export_fp32_bundle) and evaluated
through the runtime (ONNX Runtime, tiled as on the device, MIL re-scoring applied from the manifest):
- student       `cyto-edge train student_cpu`
- + LD          `cyto-edge distill student_ld --teacher T`
- + MIL         `cyto-edge train student_mil`
- + LD + MIL    `cyto-edge distill student_ld_mil --teacher T`
- teacher       `cyto-edge train teacher_cpu` (T: the seed-0 teacher, cached and shared)
Figures: mAP@0.5 (and mAP@[.5:.95]) mean ± std over seeds; the ordering checks of the paper (+ MIL beats
the student, + LD + MIL is the best student row), counted only when the teacher reaches 0.5 mAP@0.5.

Steps: the recipes' own (epochs x steps_per_epoch), multiplied by --step-scale (--small: 0.1, and one
seed per row, seed 0, unless --seeds is given, so that run_all stays within its hour). Full: 400 fields
of 512 px; --small: 240.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import emit, parser
from _detection import NOISE, evaluate, mean_std, noisy_synth, overrides, teacher_checkpoint, train

ROWS = {"student": ("student_cpu", False), "+LD": ("student_ld", True), "+MIL": ("student_mil", False),
        "+LD+MIL": ("student_ld_mil", True), "teacher": ("teacher_cpu", False)}


def settings(small: bool) -> dict:
    if small:
        return dict(images=240, size=512, test_fraction=0.35, step_scale=0.1, teacher_seeds=1, seeds=1)
    return dict(images=400, size=512, test_fraction=0.3, step_scale=1.0, teacher_seeds=None, seeds=None)


def run_row(row: str, seeds: list[int], data: Path, st: dict, threads: int, tmp: Path, teacher: Path | None) -> list[dict]:
    recipe, needs_teacher = ROWS[row]
    out = []
    for seed in seeds:
        if row == "teacher" and seed == 0:
            last, secs = teacher, float((teacher.parent / "train_seconds.txt").read_text())
            cmd = (teacher.parent / "command.txt").read_text()
        else:
            sets, _ = overrides(recipe, data, seed, st["step_scale"], threads, tmp / "runs", teacher if needs_teacher else None)
            last, secs = train(recipe, sets)
            verb = "distill" if needs_teacher else "train"
            cmd = f"cyto-edge {verb} {recipe} " + " ".join(f"--set {s}" for s in sets)
        ev = evaluate(last, data, threads, tmp / "bundles" / row.replace("+", "plus_"))
        print(f"[ablation] {row} seed {seed}: mAP@0.5 {ev['map50']:.3f} ({secs:.0f} s training)", file=sys.stderr,
              flush=True)
        out.append({**ev, "seed": seed, "train_seconds": round(secs, 1), "command": cmd})
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads.")
    p.add_argument("--step-scale", type=float, default=None, help="Multiply the recipes' steps (default: 1, --small 0.1).")
    p.add_argument("--rows", default=",".join(ROWS), help=f"Comma-separated rows (default all: {','.join(ROWS)}).")
    p.set_defaults(seeds=None)                     # None: 0,1,2 (--small: the settings' count per row)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    st = settings(args.small)
    if args.step_scale is not None:
        st["step_scale"] = args.step_scale
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"--rows: unknown {', '.join(sorted(unknown))} (choose from {', '.join(ROWS)})")
    data = noisy_synth(st)
    needs = any(ROWS[r][1] or r == "teacher" for r in rows)
    teacher = teacher_checkpoint(data, st, args.threads, tag="ablation") if needs else None
    tmp = Path(tempfile.mkdtemp(prefix="ablation-"))
    info = {"fields": st["images"], "field_px": st["size"], "noise": NOISE, "step_scale": st["step_scale"],
            "data": str(data), "teacher": str(teacher)}
    results: dict[str, list[dict]] = {}
    for row in rows:
        keep = st["teacher_seeds"] if row == "teacher" else st["seeds"]
        seeds = args.seeds or [0, 1, 2][:keep or 3]
        results[row] = run_row(row, seeds, data, st, args.threads, tmp, teacher)
        rs = results[row]
        figures = {"map50": mean_std([r["map50"] for r in rs]), "map": mean_std([r["map"] for r in rs]),
                   "train_seconds": mean_std([r["train_seconds"] for r in rs])["mean"]}
        if all("map50_no_rescore" in r for r in rs):
            figures["map50_no_rescore"] = mean_std([r["map50_no_rescore"] for r in rs])
        emit("ablation", figures,
             torch_threads=args.threads, ort_threads=args.threads, row=row, recipe=ROWS[row][0],
             seeds=[r["seed"] for r in rs], train_command=rs[0]["command"], **info)
    emit("ablation_summary", summary(results), torch_threads=args.threads, ort_threads=args.threads, **info)


def summary(results: dict[str, list[dict]]) -> dict:
    m = {row: float(np.mean([r["map50"] for r in rs])) for row, rs in results.items()}
    out: dict = {"map50_mean": {k: round(v, 4) for k, v in m.items()}}
    if "teacher" in m:
        out["teacher_ok"] = m["teacher"] >= 0.5
    if "+MIL" in m and "student" in m:
        out["mil_beats_student"] = m["+MIL"] > m["student"]
    students = {k: v for k, v in m.items() if k != "teacher"}
    if "+LD+MIL" in students and len(students) > 1:
        out["ld_mil_best_student"] = max(students, key=students.get) == "+LD+MIL"
    out["counts"] = bool(out.get("teacher_ok"))
    return out


if __name__ == "__main__":
    main()
