"""`cyto-edge export` and `build-engine`."""
from __future__ import annotations

from pathlib import Path

import typer

from cyto_edge._cli_util import not_yet


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(ckpt: Path = typer.Argument(...), target: str = typer.Option("cpu", "--target")):
        """Export a checkpoint to a verified model bundle."""
        not_yet("export", "export")

    @app.command("build-engine")
    def build_engine(bundle: Path = typer.Argument(...)):
        """(On the Jetson) build a TensorRT plan into the bundle."""
        not_yet("build-engine", "export")
