"""`cyto-edge train`."""
from __future__ import annotations

import typer

from cyto_edge._cli_util import not_yet


def register(app: typer.Typer) -> None:
    @app.command("train")
    def _cmd():
        """Train a teacher or student detector."""
        not_yet("train", "detection core")
