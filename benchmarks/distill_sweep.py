"""A one-factor-at-a-time sweep of the local-distillation weights (T, alpha, beta, gamma) around the defaults.

The centre is `DistillCfg`'s defaults (cyto_edge/train/config.py), read at run time; each config changes
one factor (alpha and beta together keep their ratio): T in {0.5, 1.0}; alpha, beta x0.1 and x10; beta
alone x0.1; gamma x0.1 and x10. Seven `cyto-edge distill student_ld --teacher T --set distill.X=..` runs
and one plain `cyto-edge train student_cpu` reference, one seed (the first of --seeds), on short
schedules (the recipes' epochs with steps_per_epoch x step scale: full 0.5, --small 0.02). Data and
teacher are those of benchmarks/distillation.py at the same setting (shared through the cache); the
teacher is evaluated once for context. Each run is exported to an fp32 bundle and evaluated through the
runtime on the clean test split. One JSON line per config: mAP@0.5, mAP@[.5:.95], the per-epoch loss
terms and the (ld_fea + ld_att) / multibox ratio. This script changes no default: choose them from its
output and record the command and table in the README.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from _common import emit, parser
from _detection import command, evaluate, loss_terms, overrides, ratio_range, teacher_checkpoint, train
from distillation import dataset, settings

FACTORS = ("temperature", "alpha", "beta", "gamma")


def grid(defaults: dict) -> list[tuple[str, dict]]:
    """[(name, {temperature, alpha, beta, gamma})]: the defaults, then one factor changed at a time."""
    d = {k: defaults[k] for k in FACTORS}
    t_alt = 1.0 if d["temperature"] != 1.0 else 0.5
    scaled = lambda **f: {**d, **{k: float(f"{d[k] * v:.6g}") for k, v in f.items()}}  # noqa: E731
    return [("default", dict(d)), (f"T={t_alt:g}", {**d, "temperature": t_alt}),
            ("alpha,beta x0.1", scaled(alpha=0.1, beta=0.1)), ("alpha,beta x10", scaled(alpha=10, beta=10)),
            ("beta x0.1", scaled(beta=0.1)), ("gamma x0.1", scaled(gamma=0.1)), ("gamma x10", scaled(gamma=10))]


def sweep_settings(small: bool, smoke: bool) -> dict:
    st = settings(small, smoke)   # data, teacher schedule: benchmarks/distillation.py's
    st["student_scale"] = st["step_scale"] if smoke else (0.02 if small else 0.5)
    return st


def run(name: str, recipe: str, values: dict | None, data: Path, st: dict, seed: int, threads: int, tmp: Path,
        teacher: Path) -> dict:
    sets, steps = overrides(recipe, data, seed, st["student_scale"], threads, tmp / "runs" / _slug(name),
                            teacher if values else None, epochs=st["epochs"])
    sets += [f"distill.{k}={v:g}" for k, v in (values or {}).items()]
    ckpt, secs = train(recipe, sets)
    ev = evaluate(ckpt, data, threads, tmp / "bundles" / _slug(name))
    terms = loss_terms(ckpt.parent)
    print(f"[distill_sweep] {name}: mAP@0.5 {ev['map50']:.3f} ({secs:.0f} s training)", file=sys.stderr, flush=True)
    ratios = [t["ld_over_multibox"] for t in terms if t.get("ld_over_multibox") is not None]
    fig = {"map50": round(ev["map50"], 4), "map": round(ev["map"], 4), "train_seconds": round(secs, 1),
           "steps": steps, "ld_over_multibox": ratio_range({"ld_over_multibox": ratios}),
           "ld_over_multibox_mean": round(sum(ratios) / len(ratios), 6) if ratios else None}
    return {"figures": fig, "terms": terms, "command": command(recipe, sets, bool(values))}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads.")
    p.add_argument("--labels", choices=["clean", "noisy"], default="clean", help="As benchmarks/distillation.py.")
    p.add_argument("--smoke", action="store_true", help=__import__("argparse").SUPPRESS)   # wiring check, 2 steps
    args = p.parse_args()
    import torch

    from cyto_edge.train.config import DistillCfg, load_config

    torch.set_num_threads(args.threads)
    st = sweep_settings(args.small, args.smoke)
    seed = args.seeds[0]
    data = dataset(st, args.labels)
    teacher = teacher_checkpoint(data, st, args.threads, 0, tag="distill_sweep")
    defaults = DistillCfg().model_dump()
    recipe_ld = load_config("student_ld", [f"data.root={data}"]).distill.model_dump()
    info = {"labels": args.labels, "fields": st["images"], "field_px": st["size"], "seed": seed,
            "student_step_scale": st["student_scale"], "teacher_step_scale": st["step_scale"], "data": str(data),
            "teacher": str(teacher), "defaults": {k: defaults[k] for k in FACTORS},
            "student_ld_recipe": {k: recipe_ld[k] for k in (*FACTORS, "weight")},
            **({"smoke": True} if args.smoke else {})}
    tmp = Path(tempfile.mkdtemp(prefix="distill-sweep-"))
    try:
        t_ev = evaluate(teacher, data, args.threads, tmp / "bundles" / "teacher")
        info["teacher_map50"] = round(t_ev["map50"], 4)
        configs = [("student (no LD)", "student_cpu", None)] + [(n, "student_ld", v) for n, v in grid(defaults)]
        for name, recipe, values in configs:
            r = run(name, recipe, values, data, st, seed, args.threads, tmp, teacher)
            emit("distill_sweep", r["figures"], torch_threads=args.threads, ort_threads=args.threads, config=name,
                 recipe=recipe, distill=values, train_command=r["command"], loss_terms_per_epoch=r["terms"], **info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
