"""`cyto-edge train`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

HELP = """Train a teacher or student SSD detector on crops of full-resolution images.

CONFIG is a YAML recipe or the name of a shipped one (see `--list`). Any field can be overridden:

    cyto-edge train student_cpu --set data.root=data/synth --set schedule.epochs=20

Training takes crops of the model's input size at the model's physical scale (µm/px), validates on
full images tiled exactly as the device does (mAP@0.5 on a seeded validation split carved from train),
and writes last.pt (every epoch, resumable) and best.pt (best validation mAP) to OUT/NAME/.
Multi-GPU / multi-process: torchrun --nproc_per_node N -m cyto_edge.cli train CONFIG (NCCL on GPU,
gloo on CPU).

Weak or incomplete labels: a recipe with a `mil:` section (e.g. student_mil) also trains the MIL detector
(LD-WSCCD eq. 15-16, OICR refinement) on boxed and image-level-only images (a `train_labels.csv` beside the
COCO files); its refined scores re-score the detections, in validation and in the exported bundle.

    cyto-edge train student_mil --data data/weak
"""


def register(app: typer.Typer) -> None:
    @app.command("train", help=HELP)
    def train(
        config: Optional[str] = typer.Argument(None, help="YAML recipe or shipped recipe name."),
        set_: list[str] = typer.Option([], "--set", help="Override a field: key.sub=value (repeatable)."),
        data: Optional[Path] = typer.Option(None, "--data", help="Shortcut for --set data.root=PATH."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output root (default: runs/)."),
        name: Optional[str] = typer.Option(None, "--name", help="Run name (default: the recipe's)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from OUT/NAME/last.pt."),
        list_: bool = typer.Option(False, "--list", help="List the shipped recipes and exit."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ):
        from cyto_edge._cli_util import print_json
        from cyto_edge.errors import BadInput
        from cyto_edge.train.config import load_config, shipped_recipes

        if list_:
            for r in shipped_recipes():
                typer.echo(r)
            return
        if config is None:
            raise BadInput("give a recipe (a YAML file or a shipped name; see --list)")
        overrides = list(set_)
        if data is not None:
            overrides.append(f"data.root={data}")
        if out is not None:
            overrides.append(f"out_dir={out}")
        if name is not None:
            overrides.append(f"name={name}")
        cfg = load_config(config, overrides)
        from cyto_edge.train.components import build_components
        from cyto_edge.train.loop import Trainer

        import os

        result = Trainer(cfg, resume=resume, components=build_components(cfg)).run()
        if os.environ.get("RANK", "0") != "0":
            return
        if json_out:
            print_json(result)
        else:
            typer.echo(f"best val mAP@0.5 {result['best_map50']:.3f}; checkpoints in {result['out_dir']}")

    @app.command("slim", help=SLIM_HELP)
    def slim(
        ckpt: Path = typer.Argument(..., help="A detector checkpoint written by train or distill (best.pt, last.pt)."),
        out: Path = typer.Argument(..., help="The slim checkpoint to write (.pt)."),
        fp32: bool = typer.Option(False, "--fp32", help="Keep the weights in fp32 (default: fp16)."),
    ):
        from cyto_edge.errors import BadInput
        from cyto_edge.runtime.bundle import sha256_file
        from cyto_edge.train.checkpoint import load_checkpoint, save_checkpoint, slim_checkpoint

        if out.resolve() == ckpt.resolve():
            raise BadInput(f"{out}: give another path; the slim checkpoint would replace the resumable one")
        ck = load_checkpoint(ckpt)
        save_checkpoint(out, {k: v for k, v in slim_checkpoint(ck, half=not fp32).items() if k != "format"})
        mb = lambda p: p.stat().st_size / 1e6  # noqa: E731
        typer.echo(f"{out}: {mb(out):.1f} MB (from {mb(ckpt):.1f} MB), sha256 {sha256_file(out)}")


SLIM_HELP = """Write the checkpoint to publish: the EMA weights in fp16, without the optimizer state.

eval, export, distill --teacher and --set model.init= read it like the full checkpoint (the weights are
loaded into the fp32 model); only --resume cannot, so keep last.pt for that. About an eighth of the size of last.pt.

    cyto-edge slim runs/teacher_cpu/best.pt weights/teacher_cpu.pt
"""
