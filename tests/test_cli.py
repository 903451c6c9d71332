"""The whole command tree, walked from the app: every command teaches with --help, every command that has
not landed yet says so in one line with exit 2, unknown commands are usage errors, and no traceback."""
from __future__ import annotations

import ast
import enum
import inspect
import re
import subprocess
import sys
import textwrap
import types
import typing
from pathlib import Path

import pytest
import typer

from cyto_edge import __version__
from cyto_edge.cli import app, main

CLI = [sys.executable, "-m", "cyto_edge.cli"]


def _walk(cmd, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """(path, command) for every command and group below `cmd` (groups have `.commands`)."""
    out = [(path, cmd)] if path else []
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        out += _walk(sub, (*path, name))
    return out


ROOT_CMD = typer.main.get_command(app)
COMMANDS = _walk(ROOT_CMD)
IDS = [" ".join(p) for p, _ in COMMANDS]


def _is_group(cmd) -> bool:
    return hasattr(cmd, "commands")


def _not_yet(cmd) -> bool:
    """True when the command's body starts with `not_yet(...)`: a placeholder for a later issue."""
    if cmd.callback is None or _is_group(cmd):
        return False
    fn = inspect.unwrap(cmd.callback)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    body = tree.body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # docstring
    first = body[0] if body else None
    return (isinstance(first, ast.Expr) and isinstance(first.value, ast.Call)
            and getattr(first.value.func, "id", None) == "not_yet")


def _dummy_value(annotation, tmp_path: Path) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType, list, tuple):
        return _dummy_value(args[0], tmp_path)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return str(next(iter(annotation)).value)
    if annotation in (int, float):
        return "1"
    f = tmp_path / "input.txt"
    f.write_text("x")
    return str(f)


def _dummy_args(cmd, tmp_path: Path) -> list[str]:
    """Values for the required parameters (from the callback's annotations), so that a placeholder
    command gets past argument parsing to its own message."""
    hints = typing.get_type_hints(inspect.unwrap(cmd.callback))
    out: list[str] = []
    for p in cmd.params:
        if not p.required:
            continue
        value = _dummy_value(hints.get(p.name, str), tmp_path)
        out += [p.opts[0], value] if p.opts and p.opts[0].startswith("-") else [value]
    return out


NOT_YET = [(p, c) for p, c in COMMANDS if _not_yet(c)]


def _flat(text: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]+", "", text)


def test_walk_finds_the_design_command_tree():
    names = set(IDS)
    for expected in ("doctor", "demo", "synth", "train", "export", "run", "serve", "data check",
                     "bundle info", "bundle verify", "config check", "config show"):
        assert expected in names, f"`cyto-edge {expected}` is missing from the command tree"


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=IDS)
def test_help_teaches(path, cmd, capsys):
    assert (cmd.help or "").strip(), f"`cyto-edge {' '.join(path)}` has no help text (write its docstring)"
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    first = cmd.help.strip().splitlines()[0]
    assert _flat(first)[:40] in _flat(out), f"--help of {' '.join(path)} does not show its description"


@pytest.mark.parametrize("path,cmd", NOT_YET, ids=[" ".join(p) for p, _ in NOT_YET])
def test_placeholder_says_so_in_one_line(path, cmd, tmp_path, capsys):
    rc = main([*path, *_dummy_args(cmd, tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "not available" in err and "Traceback" not in err


def test_placeholders_as_processes_have_no_traceback(tmp_path):
    if not NOT_YET:
        pytest.skip("every command is implemented")
    for path, cmd in NOT_YET[:2]:
        r = subprocess.run([*CLI, *path, *_dummy_args(cmd, tmp_path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_version():
    r = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"cyto-edge {__version__}"


@pytest.mark.parametrize("argv", [["no-such-command"], ["data", "no-such-subcommand"]])
def test_unknown_command_is_a_usage_error(argv):
    r = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "No such command" in r.stderr and "Traceback" not in r.stderr


def test_console_script_runs():
    exe = Path(sys.executable).with_name("cyto-edge")
    if not exe.exists():
        pytest.skip("the cyto-edge console script is not installed beside this python")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "doctor" in r.stdout


def test_missing_argument_is_a_usage_error():
    r = subprocess.run([*CLI, "bundle", "info"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "Missing argument" in r.stderr and "Traceback" not in r.stderr
