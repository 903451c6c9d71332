"""`cyto-edge pretrain`."""
from __future__ import annotations

import typer

from cyto_edge._cli_util import not_yet


def register(app: typer.Typer) -> None:
    @app.command("pretrain")
    def _cmd():
        """Self-supervised jigsaw pretraining on unlabeled frames."""
        not_yet("pretrain", "self-supervised pretraining")
