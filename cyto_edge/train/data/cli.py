"""`cyto-edge data check|split|stats`."""
from __future__ import annotations

from pathlib import Path

import typer

from cyto_edge._cli_util import not_yet


def register(data_app: typer.Typer) -> None:
    @data_app.command("check")
    def data_check(path: Path = typer.Argument(..., help="Dataset directory or annotation file.")):
        """Validate a dataset: per-class counts, image and box sizes; exit 2 naming the first problem."""
        not_yet("data check", "datasets")
