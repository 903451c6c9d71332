"""`cyto-edge distill`."""
from __future__ import annotations

import typer

from cyto_edge._cli_util import not_yet


def register(app: typer.Typer) -> None:
    @app.command("distill")
    def _cmd():
        """Train a student with local distillation from a frozen teacher."""
        not_yet("distill", "local distillation")
