"""`cyto-edge serve`."""
from __future__ import annotations

from pathlib import Path

import typer

from cyto_edge._cli_util import not_yet


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(profile: Path = typer.Option(..., "--profile")):
        """The live screening daemon."""
        not_yet("serve", "daemon")
