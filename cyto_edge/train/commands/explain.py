"""`cyto-edge explain`."""
from __future__ import annotations

import typer

from cyto_edge._cli_util import not_yet


def register(app: typer.Typer) -> None:
    @app.command("explain")
    def _cmd():
        """Integrated-gradients explanation of a classifier or detection score."""
        not_yet("explain", "explanations")
