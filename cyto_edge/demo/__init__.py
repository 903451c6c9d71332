"""`cyto-edge demo`: the whole chain on synthetic data, CPU only.

The sizes (QUICK, FULL) are in cyto_edge/demo/plan.py; the steps in core.py; their processes and the
progress display in runner.py; the daemon's report and the evaluation in tasks.py; the closing summary
in summary.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

HELP = """The whole chain on synthetic data, CPU only: from nothing to a screened slide.

\b
Steps (each a cyto-edge command in its own process; its output in OUT/logs/):
  1 synth        a small dataset with label noise (dropped / jittered boxes,
                 image-level-only fields) and a slide for the synth:// stage
  2 data split   the validation split the checkpoints are chosen on
  3 train        a teacher (recipe teacher_cpu; quick: tiny), few steps
  4 distill      a student with local distillation + MIL (student_ld_mil)
  5 export       an INT8 bundle for the CPU through the acceptance gate
  6 calibrate    per-class operating thresholds on the validation split
  7 eval         the bundle on the test split: mAP and PR curves
  8 run          the bundle on a synth:// moving stage: annotated video
  9 report       the daemon grades the slide: the report page (HTML)

A gate that refuses the INT8 file (a toy model is easily too weak) does not
stop the demo: the refusal is printed and the demo goes on with the file that
passed. At the end: mAP of teacher and student, the gate's figures, the grade
of every FOV, the worst grade, adequacy, the most suspicious cells, and the
paths of the report page, the video and the PR curves.

\b
Sizes: --quick (tiny models, a few steps; under 3 minutes on 2 cores) or the
full demo (~12 minutes on 2 cores). OUT must be new or empty; --force runs
again into an OUT made by an earlier demo.

\b
Examples:
  cyto-edge demo --quick
  cyto-edge demo --serve          then open http://127.0.0.1:8080/
  cyto-edge demo --serve --out D  (a finished demo in D) serves it again
"""


def register(app: typer.Typer) -> None:
    @app.command("demo", help=HELP)
    def demo(
        quick: bool = typer.Option(False, "--quick", help="Toy size: tiny models, a few steps (under 3 minutes)."),
        out: Path = typer.Option(Path("cyto-edge-demo"), "--out", help="Output directory (new or empty)."),
        force: bool = typer.Option(False, "--force", help="Replace the results of an earlier demo in OUT."),
        serve: bool = typer.Option(False, "--serve", help="Then start the screening daemon on the result "
                                   "(a live synth:// stage over the slide) instead of exiting."),
        port: int = typer.Option(8080, "--port", min=0, max=65535, help="Port of the daemon with --serve."),
        threads: int = typer.Option(2, "--threads", min=1, help="CPU threads for training and the engines."),
        teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher recipe (default: the size's)."),
        student: Optional[str] = typer.Option(None, "--student", help="Student recipe (default: student_ld_mil)."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON (also in OUT/summary.json)."),
    ):
        import os
        import sys

        from rich.console import Console

        from cyto_edge.demo.core import read_marker, run_demo, serve_argv
        from cyto_edge.demo.plan import FULL, QUICK, Paths

        console = Console(stderr=True)
        p = Paths.of(out)
        mark = read_marker(p) if p.out.is_dir() else None
        reuse = serve and not force and mark is not None and mark.get("finished")
        if reuse:
            console.print(f"{p.out} holds a finished demo; serving it (--force runs the demo again)")
        else:
            res = run_demo(p.out, QUICK if quick else FULL, console=console, force=force, threads=threads,
                           teacher=teacher, student=student)
            if json_out:
                from cyto_edge._cli_util import print_json

                print_json(res)
            else:
                from cyto_edge.demo.summary import print_summary

                print_summary(res, Console())
        if serve:
            argv = serve_argv(p.out, port)
            console.print(f"starting the daemon: http://127.0.0.1:{port}/ (Ctrl-C stops it)")
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(argv[0], argv)
