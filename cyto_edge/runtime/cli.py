"""Device-side commands (torch-free)."""
from __future__ import annotations

from pathlib import Path

import typer

from cyto_edge._cli_util import not_yet

bundle_app = typer.Typer(help="Inspect and verify model bundles.", no_args_is_help=True)
config_app = typer.Typer(help="Validate and show device profiles.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(bundle_app, name="bundle")
    app.add_typer(config_app, name="config")

    @bundle_app.command("info")
    def bundle_info(path: Path = typer.Argument(...)):
        """Show a bundle's manifest."""
        not_yet("bundle info", "export")

    @bundle_app.command("verify")
    def bundle_verify(path: Path = typer.Argument(...)):
        """Verify a bundle's files against its manifest."""
        not_yet("bundle verify", "export")

    @config_app.command("check")
    def config_check(profile: Path = typer.Argument(...)):
        """Validate a device profile."""
        not_yet("config check", "runtime")

    @config_app.command("show")
    def config_show(profile: Path = typer.Argument(...)):
        """Show a device profile with its defaults filled in."""
        not_yet("config show", "runtime")

    @app.command("run")
    def run(bundle: Path = typer.Argument(...), source: str = typer.Option(..., "--source")):
        """Run a bundle on a live or recorded source."""
        not_yet("run", "runtime")

    @app.command("bench")
    def bench(bundle: Path = typer.Argument(...)):
        """Raw engine vs pipeline throughput, per-stage timings."""
        not_yet("bench", "runtime")

    @app.command("calibrate")
    def calibrate(bundle: Path = typer.Argument(...), data: Path = typer.Option(..., "--data")):
        """Choose per-class operating thresholds and write them into the manifest."""
        not_yet("calibrate", "runtime")

    @app.command("serve")
    def serve(profile: Path = typer.Option(..., "--profile")):
        """The live screening daemon."""
        not_yet("serve", "daemon")
