"""`cyto-edge synth`."""
from __future__ import annotations

from pathlib import Path

import typer

HELP = """Synthetic Pap-smear fields with exact labels (COCO, CDetector layout) and per-image truth.

Writes OUT/train/*.jpg, OUT/test/*.jpg, OUT/train.json and OUT/test.json (COCO; category ids in the
default taxonomy order), OUT/train.clean.json (exact train boxes before label noise / weakening),
OUT/train_labels.csv (`file,labels` of the weak train images), OUT/synth.json (every parameter) and,
with --slide, OUT/slide/ (a large slide and the stop schedule that `synth://?path=OUT/slide` replays).

Each COCO image has `truth`: fov_grade (most severe Bethesda category present, NILM if none),
organisms, squamous_count, nuclei_count, focus (0 sharp .. 1 very blurred; blur sigma = 4 µm x focus),
empty. The same options and seed give identical files.

Examples:

  cyto-edge synth data/synth --images 200 --seed 0

  cyto-edge synth data/weak --images 400 --label-noise drop=0.2,jitter=0.1 --weak-fraction 0.5
"""


def register(app: typer.Typer) -> None:
    @app.command("synth", help=HELP)
    def synth(
        out: Path = typer.Argument(..., help="Output directory (created; must be empty unless --force)."),
        images: int = typer.Option(100, "--images", "-n", help="Fields to render (train + test)."),
        size: int = typer.Option(1024, "--size", help="Field side in pixels (square)."),
        seed: int = typer.Option(0, "--seed", help="Random seed: same seed, same files."),
        label_noise: str = typer.Option("", "--label-noise",
                                        help="Train-only box noise: drop=F (fraction removed), jitter=F (max shift/resize "
                                             "as a fraction of the box size), e.g. drop=0.2,jitter=0.1."),
        weak_fraction: float = typer.Option(0.0, "--weak-fraction",
                                            help="Fraction of train images with image-level labels only."),
        test_fraction: float = typer.Option(0.2, "--test-fraction", help="Fraction of images in the test split."),
        um_per_px: float = typer.Option(1.0, "--um-per-px", help="Physical scale of the fields (µm per pixel)."),
        max_object_px: float = typer.Option(160.0, "--max-object-px",
                                            help="No labelled object longer than this (≤ the runtime's tile overlap)."),
        slide: bool = typer.Option(True, "--slide/--no-slide", help="Also write OUT/slide/ for synth://."),
        slide_size: str = typer.Option("4096x3072", "--slide-size", help="Slide size WIDTHxHEIGHT in pixels."),
        stops: int = typer.Option(12, "--stops", help="Stops of the slide's moving-stage schedule."),
        workers: int = typer.Option(1, "--workers", "-j", help="Processes rendering in parallel (output is identical)."),
        force: bool = typer.Option(False, "--force", help="Write into a non-empty OUT (files of the same name are replaced)."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ):
        import time

        from cyto_edge._cli_util import print_json
        from cyto_edge.errors import BadInput
        from cyto_edge.synth.options import SynthOptions, parse_label_noise, parse_size

        drop, jitter = parse_label_noise(label_noise)
        sw, sh = parse_size(slide_size)
        opts = SynthOptions(images=images, size=size, seed=seed, drop=drop, jitter=jitter, weak_fraction=weak_fraction,
                            test_fraction=test_fraction, um_per_px=um_per_px, max_object_px=max_object_px, slide=slide,
                            slide_width=sw, slide_height=sh, stops=stops, workers=workers)
        if out.exists() and not out.is_dir():
            raise BadInput(f"{out}: exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise BadInput(f"{out}: directory is not empty; choose another OUT or pass --force")
        t0 = time.perf_counter()
        summary = _run(out, opts, quiet=json_out)
        seconds = time.perf_counter() - t0
        if json_out:
            print_json({**summary, "out": str(out), "seconds": round(seconds, 2)})
        else:
            _print_table(out, summary, seconds)


def _run(out: Path, opts, quiet: bool) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from cyto_edge.synth.writer import generate

    console = Console(stderr=True)
    with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=quiet, transient=False) as bar:
        task = bar.add_task("fields", total=opts.images)
        summary = generate(out, opts, progress=lambda: bar.advance(task))
    return summary


def _print_table(out: Path, summary: dict, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{out}  ({seconds:.1f} s)")
    t.add_column("class")
    t.add_column("train", justify="right")
    t.add_column("test", justify="right")
    for c in summary["classes"]:
        t.add_row(c, str(summary["train"]["per_class"][c]), str(summary["test"]["per_class"][c]))
    t.add_row("images", str(summary["train"]["images"]), str(summary["test"]["images"]), style="bold")
    t.add_row("weak images", str(summary["train"]["weak"]), "0")
    n = summary["label_noise"]
    t.add_row("boxes dropped / jittered", f"{n['dropped']} / {n['jittered']}", "0 / 0")
    Console().print(t)
    if "slide" in summary:
        s = summary["slide"]
        Console().print(f"slide: {out / 'slide'} {s['width']}x{s['height']}, {s['stops']} stops "
                        f"(empty: {s['empty_stops']}), {s['objects']} labelled objects")
