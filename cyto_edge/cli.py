"""The `cyto-edge` command line. Each subpackage contributes its commands through `register(app)`;
commands stay thin (parse, validate, call one function) and import heavy libraries inside the call."""
from __future__ import annotations

import importlib
import sys

import typer

from cyto_edge import DISCLAIMER, __version__

app = typer.Typer(
    name="cyto-edge",
    help=f"Cervical-cytology cell detection from training to the microscope. {DISCLAIMER}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Modules that add commands; a module that fails to import for a missing optional dependency still
# lets every other command work.
COMMAND_MODULES = (
    "cyto_edge.synth.cli",
    "cyto_edge.train.cli",
    "cyto_edge.export.cli",
    "cyto_edge.runtime.cli",
    "cyto_edge.doctor",
    "cyto_edge.demo",
)


def _version(value: bool):
    if value:
        typer.echo(f"cyto-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Cervical-cytology cell detection from training to the microscope."""


for _mod in COMMAND_MODULES:
    importlib.import_module(_mod).register(app)


def _click_errors() -> tuple[tuple, tuple, tuple]:
    """(exit, abort, usage-error) classes: click's and, for typer >= 0.2x, typer's vendored copies."""
    import click

    exits, aborts, usage = {click.exceptions.Exit, typer.Exit}, {click.exceptions.Abort, typer.Abort}, {click.ClickException}
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # older typer uses click itself
        pass
    else:
        usage.add(ClickException)
    return tuple(exits), tuple(aborts), tuple(usage)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors with exit codes 1 (failed check) or 2 (bad usage / input)."""
    from cyto_edge.errors import CytoError, format_validation_error

    exits, aborts, usage_errors = _click_errors()

    try:
        rv = app(args=argv, standalone_mode=False, prog_name="cyto-edge")
        # typer returns the code of an Exit (130 after Ctrl-C) instead of raising it in this mode
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except CytoError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        return e.exit_code
    except exits as e:
        return e.exit_code
    except aborts:
        typer.secho("aborted", err=True)
        return 130
    except usage_errors as e:
        e.show()
        return 2
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        return 130
    except Exception as e:  # pydantic errors that escaped a command are still bad input
        try:
            from pydantic import ValidationError
        except ImportError:  # pragma: no cover
            raise e
        if isinstance(e, ValidationError):
            typer.secho(f"error: {format_validation_error(e)}", err=True, fg="red")
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
