"""`cyto-edge train-grader`."""
from __future__ import annotations

import typer

from cyto_edge._cli_util import not_yet


def register(app: typer.Typer) -> None:
    @app.command("train-grader")
    def _cmd():
        """Train the learned FOV grader."""
        not_yet("train-grader", "second-stage models")
