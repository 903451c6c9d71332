"""`cyto-edge synth`."""
from __future__ import annotations

from pathlib import Path

import typer

from cyto_edge._cli_util import not_yet


def register(app: typer.Typer) -> None:
    @app.command("synth")
    def synth(out: Path = typer.Argument(..., help="Output directory (CDetector layout).")):
        """Synthetic Pap-smear fields with exact labels (COCO) and per-image truth."""
        not_yet("synth", "synthetic data")
