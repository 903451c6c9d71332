"""The demo's closing summary on stdout: detection figures, the slide (grade per FOV, worst grade,
adequacy, top suspicious cells), the outputs and the time of each step."""
from __future__ import annotations

from cyto_edge import DISCLAIMER


def _f(v, d: int = 3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def _mmss(s: float) -> str:
    return f"{int(s // 60)}:{int(s % 60):02d}"


def print_summary(res: dict, console) -> None:
    from rich.table import Table

    console.print()
    console.print(f"[bold]{DISCLAIMER}[/]")
    _detection(res, console)
    run, rep = res["run"], res["report"]
    s = run["summary"]
    console.print(f"\n[bold]Slide[/] (synth:// moving stage, {run['stops']} stops, {run['frames']} frames): "
                  f"{s['n_fovs']} FOVs graded by `cyto-edge run` with the {res['export']['run_precision']} model")
    t = Table(show_edge=False, pad_edge=False)
    for col in ("FOV", "stop", "grade", "truth", "suspicion", "detections", "squamous"):
        t.add_column(col, justify="left" if col in ("grade", "truth") else "right")
    for f in run["fovs"]:
        t.add_row(str(f["fov"]), str(f["stop"]), f["grade"], f["truth"] or "-", _f(f["suspicion"], 2),
                  str(f["detections"]), "-" if f["squamous"] is None else str(f["squamous"]))
    console.print(t)
    console.print(f"worst grade [bold]{s['worst_grade']}[/]; adequacy [bold]{s['adequacy']}[/] "
                  f"({s['adequacy_reason']})")
    cells = s.get("top_cells") or []
    if cells:
        console.print("top suspicious cells: " + ", ".join(
            f"{c['cls']} ({c['category']}) {c['score']:.2f} in FOV {c['fov']}" for c in cells[:5]))
    else:
        console.print("top suspicious cells: none above the operating thresholds")
    same = rep["n_fovs"] == s["n_fovs"] and rep["worst_grade"] == s["worst_grade"]
    console.print(f"the daemon graded the same pass into session {rep['session']}: {rep['n_fovs']} FOVs, worst grade "
                  f"{rep['worst_grade']}" + ("" if same else " [yellow](differs from the run above)[/]"))
    _outputs(res, console)


def _detection(res: dict, console) -> None:
    te, st, ex, test = res["teacher"], res["student"], res["export"], res["test"]
    console.print("\n[bold]Detection[/] (mAP@0.5; validation split carved from train, test split for eval)")
    console.print(f"  teacher  {te['model']:<34} val {_f(te['val_map50'])}  ({te['steps']} steps, {te['minutes']} min)")
    console.print(f"  student  {st['model']:<34} val {_f(st['val_map50'])}  ({st['steps']} steps, {st['minutes']} min)")
    files = " · ".join(f"{p} {_f(r['map50'])}" for p, r in ex["files"].items())
    console.print(f"  export   torch {_f(ex['torch_map50'])} · {files}  on {ex['gate_images']} gate images")
    if ex["gate_passed"]:
        console.print("  gate     [green]passed[/]")
    else:
        why = "; ".join(f"{p}: {r}" for p, r in ex["failed"].items())
        console.print(f"  gate     [yellow]FAILED[/] ({why}); the demo ran the {ex['run_precision'].upper()} model")
    cal = res["calibration"]
    console.print(f"  calibrate recall {cal['target_recall']} reached for {len(cal['reached'])} of {cal['with_gt']} "
                  "classes with validation boxes")
    console.print(f"  test     {test['precision']} file on {test['n_images']} images: mAP@0.5 {_f(test['map50'])}, "
                  f"mAP@[.5:.95] {_f(test['map'])}")


def _outputs(res: dict, console) -> None:
    o = res["outputs"]
    console.print("\n[bold]Outputs[/]")
    console.print(f"  report page  {o['report']}")
    console.print(f"  video        {o['video']} ({res['run']['video_frames']} frames)")
    console.print(f"  PR curves    {o['pr_curves']}")
    console.print(f"  bundle       {o['bundle']}")
    console.print(f"  logs         {o['logs']}/ (each begins with its command)")
    times = ", ".join(f"{s['key']} {s['seconds']:.0f} s" for s in res["steps"])
    console.print(f"\n{res['size']} demo: {_mmss(res['seconds'])} ({times})")
    console.print(f"serve it: cyto-edge demo --serve --out {res['out']}")
