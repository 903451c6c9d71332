"""The demo, step by step: `run_demo(out, size)` runs the chain and returns the summary (also in
OUT/summary.json); `serve_argv(out)` is the `cyto-edge serve` command for its result.

Each step is a `cyto-edge` command (or a demo task, tasks.py) in its own process: synth -> data split ->
train (teacher) -> distill (student, LD + MIL) -> export (INT8, acceptance gate) -> calibrate -> eval ->
run (synth:// moving stage, annotated video) -> the daemon's report page. An export whose gate refuses
a file does not stop the demo: the failure is printed and recorded, and the demo goes on with the best
file that passed (FP32 when INT8 failed).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from cyto_edge import DISCLAIMER, __version__
from cyto_edge.demo import plan
from cyto_edge.demo.plan import MARKER, STEPS, DemoSize, Paths
from cyto_edge.demo.runner import StepFailed, StepRunner
from cyto_edge.errors import BadInput

TITLES = dict(STEPS)


def read_marker(p: Paths) -> dict | None:
    try:
        return json.loads(p.marker.read_text())
    except (OSError, ValueError):
        return None


def prepare_out(p: Paths, size: DemoSize, force: bool) -> None:
    """OUT must be new or empty; --force replaces an earlier demo (only a directory the demo made)."""
    if p.out.exists() and not p.out.is_dir():
        raise BadInput(f"--out {p.out}: exists and is not a directory")
    if p.out.is_dir() and any(p.out.iterdir()):
        mark = read_marker(p)
        if mark is None:
            raise BadInput(f"--out {p.out}: the directory is not empty and was not made by `cyto-edge demo`; "
                           "choose another --out")
        if not force:
            state = "a finished" if mark.get("finished") else "an unfinished"
            raise BadInput(f"--out {p.out}: holds {state} {mark.get('size', '')} demo; pass --force to run it "
                           "again (its files are replaced), or choose another --out")
        for child in p.out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    p.out.mkdir(parents=True, exist_ok=True)
    _write_marker(p, {"size": size.name, "version": __version__, "started": time.time(), "finished": None})


def _write_marker(p: Paths, d: dict) -> None:
    p.marker.write_text(json.dumps(d, indent=2))


def run_demo(out: str | Path, size: DemoSize, *, console, force: bool = False, threads: int = 2,
             teacher: str | None = None, student: str | None = None) -> dict:
    p = Paths.of(out)
    prepare_out(p, size, force)
    steps = StepRunner(p.logs, console, expect_s=size.expect_s, threads=threads)
    t0 = time.monotonic()
    console.print(f"[bold]cyto-edge demo[/] ({size.name}) in {p.out}  [dim]{DISCLAIMER}[/]")
    res: dict = {"size": size.name, "out": str(p.out), "threads": threads}

    rec = steps.run("synth", TITLES["synth"], plan.synth_cmd(p, size))
    res["data"] = _synth_result(p)
    steps.done(rec, f"{res['data']['train']} train / {res['data']['test']} test fields "
                    f"({res['data']['weak']} image-level only), slide {size.slide_size}")
    steps.done(steps.run("split", TITLES["split"], plan.split_cmd(p, size)), f"val fraction {size.val_fraction}")

    rec = steps.run("teacher", TITLES["teacher"], plan.teacher_cmd(p, size, threads, teacher))
    res["teacher"] = _train_result(p.teacher, teacher or size.teacher_recipe, size.teacher_model)
    steps.done(rec, f"{res['teacher']['model']}: val mAP@0.5 {_f(res['teacher']['val_map50'])} "
                    f"after {res['teacher']['steps']} steps")
    student = student or size.student_recipe
    rec = steps.run("student", TITLES["student"], plan.student_cmd(p, size, threads, student))
    res["student"] = _train_result(p.student, student, size.student_model)
    steps.done(rec, f"{res['student']['model']}: val mAP@0.5 {_f(res['student']['val_map50'])} "
                    f"after {res['student']['steps']} steps")

    res["export"] = _export(steps, p, size, threads)
    precision = res["export"]["run_precision"]
    _write_profiles(p, precision, threads)
    _calibrate(steps, p, size, threads, res)
    rec = steps.run("evaluate", TITLES["evaluate"], plan.evaluate_cmd(p, size, threads, precision))
    res["test"] = _eval_result(p)
    steps.done(rec, f"{precision} file on {res['test']['n_images']} test images: mAP@0.5 "
                    f"{_f(res['test']['map50'])}; PR curves in {p.eval}")
    rec = steps.run("run", TITLES["run"], plan.run_cmd(p, threads, precision))
    res["run"] = _run_result(p)
    steps.done(rec, f"{res['run']['frames']} frames, {len(res['run']['fovs'])} FOVs graded, worst grade "
                    f"{res['run']['summary']['worst_grade']}; video {p.video.name}")
    rec = steps.run("report", TITLES["report"], plan.report_cmd(p))
    res["report"] = _report_result(p)
    steps.done(rec, f"session of {res['report']['n_fovs']} FOVs, worst grade {res['report']['worst_grade']}")

    res["seconds"] = round(time.monotonic() - t0, 1)
    res["steps"] = [{"key": r.key, "title": r.title, "seconds": r.seconds, "cpu_seconds": r.cpu_seconds,
                     "exit_code": r.exit_code, "command": r.command, "log": r.log, "result": r.result}
                    for r in steps.records]
    res["outputs"] = {"report": str(p.report), "video": str(p.video), "pr_curves": str(p.pr_curves),
                      "bundle": str(p.bundle), "fovs": str(p.fovs), "logs": str(p.logs), "summary": str(p.summary)}
    p.summary.write_text(json.dumps(res, indent=2, default=str))
    mark = read_marker(p) or {}
    _write_marker(p, {**mark, "finished": time.time(), "seconds": res["seconds"]})
    return res


def serve_argv(out: str | Path, port: int | None = None) -> list[str]:
    p = Paths.of(out)
    mark = read_marker(p)
    if not mark or not mark.get("finished") or not (p.profiles / "serve.yaml").is_file():
        raise BadInput(f"--out {p.out}: holds no finished demo to serve; run `cyto-edge demo --out {p.out}` first")
    return plan.serve_cmd(p) + (["--port", str(port)] if port is not None else [])


# -- steps with decisions -----------------------------------------------------------------------------------
def _export(steps: StepRunner, p: Paths, size: DemoSize, threads: int) -> dict:
    """Export through the gate. Exit 1 with the gate's figures in the manifest is a refused file: the demo
    goes on with the best file that passed and says so; anything else is a failed step."""
    rec = steps.run("export", TITLES["export"], plan.export_cmd(p, size, threads), ok_codes=(0, 1))
    q = _manifest(p.bundle).get("quality") or {}
    gate, files = q.get("gate") or {}, q.get("files") or {}
    if rec.exit_code == 1 and gate.get("passed") is not False:
        raise steps.failed(rec)        # exit 1 for another reason than the gate (e.g. QDQ coverage)
    by_prec = {r.get("precision"): (path, r) for path, r in files.items()}
    int8_ok = by_prec.get("int8-qdq", (None, {}))[1].get("passed", False)
    fp32_ok = by_prec.get("fp32", (None, {}))[1].get("passed", False)
    run_precision = "int8" if int8_ok else "fp32"      # no file passed: FP32, the closest to the checkpoint
    failed = {path: r.get("reason") for path, r in files.items() if not r.get("passed")}
    out = {"gate_passed": bool(gate.get("passed")), "gate_images": gate.get("val_images"),
           "torch_map50": q.get("torch_val_map50"), "failed": failed, "run_precision": run_precision,
           "files": {path: {"precision": r.get("precision"), "map50": r.get("map50"), "passed": r.get("passed")}
                     for path, r in files.items()}}
    maps = " · ".join(f"{r['precision']} {_f(r['map50'])}" for r in out["files"].values())
    if out["gate_passed"]:
        steps.done(rec, f"gate passed on {out['gate_images']} images: torch {_f(out['torch_map50'])} · {maps}")
    else:
        steps.done(rec, f"[yellow]gate FAILED[/] on {out['gate_images']} images: torch {_f(out['torch_map50'])} "
                        f"· {maps}", ok=False)
        for path, why in failed.items():
            steps.console.print(f"    [yellow]{path}: {why}[/]")
        steps.console.print(f"    the bundle is marked failed (`cyto-edge bundle verify` refuses it); the demo goes "
                            f"on with its {run_precision.upper()} model" + (" (it passed)" if fp32_ok else
                                                                            ", although no file passed"))
    return out


def _calibrate(steps: StepRunner, p: Paths, size: DemoSize, threads: int, res: dict) -> None:
    rec = steps.run("calibrate", TITLES["calibrate"], plan.calibrate_cmd(p, size, threads))
    cal = (_manifest(p.bundle).get("quality") or {}).get("calibration") or {}
    classes = cal.get("classes") or {}
    reached = sorted(c for c, r in classes.items() if r.get("status") == "ok")
    with_gt = [c for c, r in classes.items() if r.get("n_gt")]
    res["calibration"] = {"target_recall": cal.get("target_recall"), "reached": reached, "with_gt": len(with_gt),
                          "thresholds": {c: r.get("threshold") for c, r in classes.items()}}
    steps.done(rec, f"recall {size.target_recall} reached for {len(reached)} of {len(with_gt)} classes "
                    f"with validation boxes")


# -- reading what the steps wrote ------------------------------------------------------------------------------
def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise StepFailed(f"{path}: expected output is missing or unreadable ({e})") from None


def _manifest(bundle: Path) -> dict:
    return _json(bundle / "manifest.json") if (bundle / "manifest.json").is_file() else {}


def _synth_result(p: Paths) -> dict:
    s = _json(p.data / "synth.json")
    return {"train": s["train"]["images"], "test": s["test"]["images"], "weak": s["train"]["weak"],
            "um_per_px": s["options"]["um_per_px"]}


def _train_result(run_dir: Path, recipe: str, model: str | None) -> dict:
    r = _json(run_dir / "result.json")
    best = r.get("best_map50")
    return {"recipe": recipe, "model": f"{model or recipe}" + (f" (recipe {recipe})" if model else ""),
            "val_map50": None if best is None or best < 0 else best, "steps": r.get("steps"),
            "minutes": r.get("minutes"), "checkpoint": r.get("best")}


def _eval_result(p: Paths) -> dict:
    m = _json(p.eval / "metrics.json")
    return {"map50": m.get("map50"), "map": m.get("map"), "n_images": m.get("n_images"),
            "precision": m.get("precision")}


def _run_result(p: Paths) -> dict:
    try:
        lines = [json.loads(x) for x in p.fovs.read_text().splitlines() if x.strip()]
    except (OSError, ValueError) as e:
        raise StepFailed(f"{p.fovs}: the run wrote no readable FOV lines ({e})") from None
    if not lines or "summary" not in lines[-1]:
        raise StepFailed(f"{p.fovs}: no summary line; the run did not finish")
    truth = {s["id"]: s["truth"] for s in _json(p.slide / "schedule.json")["stops"]}
    fovs = []
    for x in lines[:-1]:
        stop = (x.get("source_meta") or {}).get("stop_id")
        fovs.append({"fov": x["fov_id"], "stop": stop, "grade": x["grade"], "suspicion": x["suspicion"],
                     "detections": x["n_detections"], "squamous": x.get("squamous_count"),
                     "truth": (truth.get(stop) or {}).get("fov_grade")})
    last = lines[-1]
    return {"fovs": fovs, "summary": last["summary"], "frames": last["stats"]["frames"],
            "video_frames": last.get("video_frames"), "stops": len(truth)}


def _report_result(p: Paths) -> dict:
    r = _json(p.report_json)
    s = r.get("summary") or {}
    return {"session": r.get("id"), "n_fovs": s.get("n_fovs"), "worst_grade": s.get("worst_grade"),
            "adequacy": s.get("adequacy"), "gallery": len(r.get("gallery") or []), "unsaved": r.get("unsaved")}


def _write_profiles(p: Paths, precision: str, threads: int) -> None:
    """Device profiles for the daemon: one pass as fast as frames render (the report), and a live stage
    going round for `--serve`."""
    um = _synth_result(p)["um_per_px"]
    base = {"name": "demo", "description": "cyto-edge demo: the synthesized slide on a synthetic moving stage",
            "engine": {"backend": "onnxruntime", "precision": precision, "device": "cpu", "threads": threads},
            "bundle": str(p.bundle), "pipeline": {"batch_size": 4},
            "storage": {"root": str(p.store), "disk_budget_mb": 2000},
            "server": {"bind": "127.0.0.1", "port": 8080}}
    p.profiles.mkdir(parents=True, exist_ok=True)
    for name, live in (("report", False), ("serve", True)):
        cam = {"kind": "synth", "seed": 0, "realtime": live, "fps": 30, "um_per_px": um,
               "options": {"path": str(p.slide), **({"loop": 1} if live else {})}}
        text = yaml.safe_dump({**base, "camera": cam}, sort_keys=False)
        (p.profiles / f"{name}.yaml").write_text(f"# written by cyto-edge demo\n{text}")
