"""`cyto-edge run` and `cyto-edge bench`."""
from __future__ import annotations

from pathlib import Path

import typer

from cyto_edge._cli_util import not_yet


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(bundle: Path = typer.Argument(...), source: str = typer.Option(..., "--source")):
        """Run a bundle on a live or recorded source."""
        not_yet("run", "runtime")

    @app.command("bench")
    def bench(bundle: Path = typer.Argument(...)):
        """Raw engine vs pipeline throughput, per-stage timings."""
        not_yet("bench", "runtime")
