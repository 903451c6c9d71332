"""`cyto-edge calibrate`."""
from __future__ import annotations

from pathlib import Path

import typer

from cyto_edge._cli_util import not_yet


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate(bundle: Path = typer.Argument(...), data: Path = typer.Option(..., "--data")):
        """Choose per-class operating thresholds and write them into the manifest."""
        not_yet("calibrate", "runtime")
