"""`cyto-edge config check|show`."""
from __future__ import annotations

from pathlib import Path

import typer

from cyto_edge._cli_util import not_yet

config_app = typer.Typer(help="Validate and show device profiles.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")

    @config_app.command("check")
    def config_check(profile: Path = typer.Argument(...)):
        """Validate a device profile."""
        not_yet("config check", "runtime")

    @config_app.command("show")
    def config_show(profile: Path = typer.Argument(...)):
        """Show a device profile with its defaults filled in."""
        not_yet("config show", "runtime")
