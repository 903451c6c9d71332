"""`cyto-edge eval`."""
from __future__ import annotations

import typer

from cyto_edge._cli_util import not_yet


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def _cmd():
        """Evaluate a checkpoint or a bundle on a dataset."""
        not_yet("eval", "detection core")
