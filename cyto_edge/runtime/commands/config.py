"""`cyto-edge config check|show`: validate a device profile, show it with its defaults."""
from __future__ import annotations

from pathlib import Path

import typer

config_app = typer.Typer(
    help="Validate and show device profiles (firmware_configs/*.yaml).", no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]})


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")

    @config_app.command("check")
    def config_check(
        profile: Path = typer.Argument(..., help="Device profile YAML, e.g. firmware_configs/raspberry-pi-5.yaml."),
        bundle: Path = typer.Option(None, "--bundle", "-b",
                                    help="Also check the profile against this bundle (default: the profile's "
                                         "bundle when it exists): grading overrides name only its classes, "
                                         "scale and precision."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ):
        """Validate a device profile: exit 0 with a summary, 2 with the one-line reason.

        Every field is checked: a typo is reported with its path (camera.fsp: unknown field; did you mean
        'fps'?). A token written in the profile is refused: use server.token_file or server.token_env.
        """
        from cyto_edge.runtime.profile import load_profile, summary

        prof = load_profile(profile)
        info = summary(prof)
        info["warnings"] = []
        target = bundle or (prof.bundle if prof.bundle.exists() else None)
        if target is not None:
            info["bundle_checked"] = str(target)
            info["warnings"] = _check_bundle(prof, target, profile)
        else:
            info["bundle_checked"] = None
            info["warnings"].append(f"bundle {prof.bundle} not found: not checked (give --bundle)")
        _print(info, json_out)

    @config_app.command("show")
    def config_show(
        profile: Path = typer.Argument(..., help="Device profile YAML."),
        json_out: bool = typer.Option(False, "--json", help="JSON instead of YAML."),
    ):
        """Show a device profile with every default filled in and relative paths resolved."""
        from cyto_edge.runtime.profile import load_profile

        data = load_profile(profile).model_dump(mode="json")
        for section, tag in (("camera", "kind"), ("engine", "backend")):  # the tag first, as written
            data[section] = {tag: data[section][tag], **data[section]}
        if json_out:
            from cyto_edge._cli_util import print_json

            print_json(data)
        else:
            import yaml

            typer.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip())


def _check_bundle(prof, bundle_path: Path, profile_path: Path) -> list[str]:
    from cyto_edge.runtime.bundle import Bundle
    from cyto_edge.runtime.profile import check_against_bundle

    b = Bundle.open(bundle_path)
    return check_against_bundle(prof, b.manifest, source=str(profile_path))


def _print(info: dict, json_out: bool) -> None:
    if json_out:
        from cyto_edge._cli_util import print_json

        print_json({"ok": True, **info})
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    for k, v in info.items():
        if k not in ("warnings", "bundle_checked"):
            t.add_row(f"[bold]{k}[/]", str(v))
    con = Console()
    con.print(f"[green]ok[/] profile {info['name']}")
    con.print(t)
    if info["bundle_checked"]:
        con.print(f"checked against bundle {info['bundle_checked']}")
    for w in info["warnings"]:
        con.print(f"[yellow]warning:[/] {w}")
