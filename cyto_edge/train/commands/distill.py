"""`cyto-edge distill`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

HELP = """Train a student detector with local distillation (LD-WSCCD eq. 8-14) from a frozen teacher.

The loss is MultiBox + L_dis: feature imitation weighted by the teacher's spatial and channel attention,
split into foreground (inside the ground-truth boxes, weight alpha) and background (beta), plus an
attention-transfer term (gamma), on the feature levels matched by stride. The teacher must have the
same classes, input size and µm/px as the student; it runs in eval mode and is never updated.

    cyto-edge train teacher_cpu --data data/synth
    cyto-edge distill student_ld --teacher runs/teacher_cpu/best.pt --data data/synth

Every field of the recipe can be overridden with --set, e.g. --set distill.alpha=2e-3.
"""


def register(app: typer.Typer) -> None:
    @app.command("distill", help=HELP)
    def distill(
        config: str = typer.Argument(..., help="Student recipe (YAML or shipped name)."),
        teacher: Path = typer.Option(..., "--teacher", help="Teacher checkpoint (from `cyto-edge train`)."),
        set_: list[str] = typer.Option([], "--set", help="Override a field: key.sub=value (repeatable)."),
        data: Optional[Path] = typer.Option(None, "--data", help="Shortcut for --set data.root=PATH."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output root (default: runs/)."),
        name: Optional[str] = typer.Option(None, "--name", help="Run name (default: the recipe's)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from OUT/NAME/last.pt."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ):
        import os

        from cyto_edge._cli_util import print_json
        from cyto_edge.train.config import DistillCfg, load_config

        overrides = list(set_)
        if data is not None:
            overrides.append(f"data.root={data}")
        if out is not None:
            overrides.append(f"out_dir={out}")
        if name is not None:
            overrides.append(f"name={name}")
        cfg = load_config(config, overrides)
        if cfg.distill is None:
            cfg.distill = DistillCfg()
        cfg.distill.teacher = teacher
        from cyto_edge.train.components import build_components
        from cyto_edge.train.loop import Trainer

        result = Trainer(cfg, resume=resume, components=build_components(cfg)).run()
        if os.environ.get("RANK", "0") != "0":
            return
        if json_out:
            print_json(result)
        else:
            typer.echo(f"best val mAP@0.5 {result['best_map50']:.3f}; checkpoints in {result['out_dir']}")
