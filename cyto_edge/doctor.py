"""`cyto-edge doctor`."""
from __future__ import annotations

import typer

from cyto_edge._cli_util import not_yet


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(json_out: bool = typer.Option(False, "--json")):
        """What this machine has: accelerators, backends, cameras."""
        not_yet("doctor", "foundation")
