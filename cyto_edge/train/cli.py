"""Training-side commands, one module per area under train/commands/. Nothing here imports torch at
module level, so `cyto-edge --help` and the data commands work on a device without torch."""
from __future__ import annotations

import importlib

import typer

data_app = typer.Typer(help="Check, split and describe datasets.", no_args_is_help=True)

MODULES = ("train", "distill", "evaluate", "classifier", "grader", "pretrain", "explain")


def register(app: typer.Typer) -> None:
    from cyto_edge.train.data import cli as data_cli

    data_cli.register(data_app)
    app.add_typer(data_app, name="data")
    for m in MODULES:
        importlib.import_module(f"cyto_edge.train.commands.{m}").register(app)
