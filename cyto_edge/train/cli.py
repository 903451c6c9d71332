"""Training-side commands. Nothing here imports torch at module level."""
from __future__ import annotations

from pathlib import Path

import typer

from cyto_edge._cli_util import not_yet

data_app = typer.Typer(help="Check, split and describe datasets.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    from cyto_edge.train.data import cli as data_cli

    data_cli.register(data_app)
    app.add_typer(data_app, name="data")

    @app.command("train")
    def train(config: str = typer.Argument(..., help="YAML recipe or the name of a shipped recipe.")):
        """Train a teacher or student detector."""
        not_yet("train", "detection core")

    @app.command("distill")
    def distill(config: str = typer.Argument(...), teacher: Path = typer.Option(..., "--teacher")):
        """Train a student with local distillation from a frozen teacher."""
        not_yet("distill", "local distillation")

    @app.command("eval")
    def evaluate(model: Path = typer.Argument(..., help="Checkpoint (.pt) or bundle (.cytobundle)."),
                 data: Path = typer.Option(..., "--data")):
        """Evaluate a checkpoint or a bundle on a dataset."""
        not_yet("eval", "detection core")

    for name, issue in [("train-classifier", "second-stage models"), ("train-grader", "second-stage models"),
                        ("pretrain", "self-supervised pretraining"), ("explain", "explanations")]:
        def _stub(_name=name, _issue=issue):
            not_yet(_name, _issue)
        _stub.__doc__ = f"Not available yet ({issue})."
        app.command(name)(_stub)
