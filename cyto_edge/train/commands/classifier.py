"""`cyto-edge train-classifier`."""
from __future__ import annotations

import typer

from cyto_edge._cli_util import not_yet


def register(app: typer.Typer) -> None:
    @app.command("train-classifier")
    def _cmd():
        """Train the attention cell classifier."""
        not_yet("train-classifier", "second-stage models")
