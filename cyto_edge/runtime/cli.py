"""Device-side commands (torch-free), one module per area under runtime/commands/."""
from __future__ import annotations

import importlib

import typer

MODULES = ("bundle", "config", "run", "calibrate", "serve")


def register(app: typer.Typer) -> None:
    for m in MODULES:
        importlib.import_module(f"cyto_edge.runtime.commands.{m}").register(app)
