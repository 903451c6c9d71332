"""`cyto-edge bundle info|verify`."""
from __future__ import annotations

from pathlib import Path

import typer

from cyto_edge._cli_util import not_yet

bundle_app = typer.Typer(help="Inspect and verify model bundles.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(bundle_app, name="bundle")

    @bundle_app.command("info")
    def bundle_info(path: Path = typer.Argument(...)):
        """Show a bundle's manifest."""
        not_yet("bundle info", "export")

    @bundle_app.command("verify")
    def bundle_verify(path: Path = typer.Argument(...)):
        """Verify a bundle's files against its manifest."""
        not_yet("bundle verify", "export")
