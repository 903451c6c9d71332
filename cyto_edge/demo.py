"""`cyto-edge demo`: the whole chain on synthetic data, CPU only."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(quick: bool = typer.Option(False, "--quick", help="Toy size, under 3 minutes.")):
        """Run synth -> train -> export -> run on synthetic data."""
        typer.echo("demo: nothing to run yet")
