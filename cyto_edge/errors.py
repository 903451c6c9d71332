"""Errors that the command line turns into one line and an exit code.

Exit codes (DESIGN.md): 0 success, 1 a failed check (a gate, a validation), 2 bad usage or bad input.
"""
from __future__ import annotations


class CytoError(Exception):
    """Base class: `str(err)` is the one-line reason shown to the user."""

    exit_code = 2


class BadInput(CytoError):
    """Bad usage or bad input: names the file and the field, and says what to do."""

    exit_code = 2


class CheckFailed(CytoError):
    """A check ran and failed (an acceptance gate, a validation, a verification)."""

    exit_code = 1


class NotAvailable(CytoError):
    """A command or feature that this version does not provide yet."""

    exit_code = 2


class MissingExtra(CytoError):
    """An optional dependency is missing; the message names the extra to install."""

    exit_code = 2

    def __init__(self, what: str, extra: str, hint: str = ""):
        msg = f"{what} is not installed: pip install 'cyto-edge[{extra}]'"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
        self.extra = extra


def format_validation_error(err, source: str = "") -> str:
    """One line for a pydantic ValidationError: `file: camera.fps: must be > 0; ...`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if not str(p).startswith("function-"))
        msg = e.get("msg", "invalid")
        msg = msg.replace("Input should be", "must be").replace("Value error, ", "")
        parts.append(f"{loc}: {msg}" if loc else msg)
    prefix = f"{source}: " if source else ""
    return prefix + "; ".join(parts)
