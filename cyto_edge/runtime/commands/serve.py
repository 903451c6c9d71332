"""`cyto-edge serve`: the live screening daemon."""
from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        profile: Path = typer.Option(..., "--profile", "-p", help="Device profile YAML, e.g. "
                                     "firmware_configs/desktop-cpu.yaml (camera, engine, bundle, storage, server)."),
        bundle: Path = typer.Option(None, "--bundle", "-b", help="Use this bundle instead of the profile's."),
        bind: str = typer.Option(None, "--bind", help="Address to listen on (default: server.bind, 127.0.0.1). "
                                 "Anything but loopback requires a token."),
        port: int = typer.Option(None, "--port", min=0, max=65535, help="Port (default: server.port; 0 = any free)."),
        token_file: Path = typer.Option(None, "--token-file", help="A file holding the API token (overrides "
                                        "server.token_file / server.token_env)."),
        start_session: str = typer.Option(None, "--start-session", metavar="SLIDE_ID",
                                          help="Open a slide session at start unless one is open (resumed)."),
        log_format: str = typer.Option("text", "--log-format", help="text | json (one JSON object per line)."),
        log_level: str = typer.Option("info", "--log-level", help="debug | info | warning | error."),
    ):
        """The live screening daemon: camera -> detection -> FOV grades -> store, with a web view and an API.

        Opens the profile's camera and bundle, grades every field of view once (stage still, in focus, not
        empty) and stores it in the open slide session: grades, detections, scores, focus, a full-resolution
        JPEG and crops of the suspicious cells, with the bundle hash and software versions. Pages: / (live
        view), /sessions, /sessions/ID/gallery, /sessions/ID/report; JSON API under /api; /healthz; /metrics
        (Prometheus). Binds 127.0.0.1 unless told otherwise; a network bind requires a token
        (server.token_file or server.token_env, never in the YAML).

        Signals: SIGTERM/SIGINT finish the FOV in flight and close the store; SIGHUP re-verifies and swaps
        in the configured bundle (the running one stays if the new one fails). Under systemd
        (packaging/systemd/cyto-edge.service) it reports READY, STATUS and the watchdog.

        Research use only. Not for diagnostic use.
        """
        from cyto_edge.errors import BadInput
        from cyto_edge.runtime.daemon import logs

        if log_format not in ("text", "json"):
            raise BadInput(f"--log-format {log_format!r}: use text or json")
        if log_level.lower() not in ("debug", "info", "warning", "error"):
            raise BadInput(f"--log-level {log_level!r}: use debug, info, warning or error")
        logs.setup(log_format, log_level)
        _run(profile, bundle, bind, port, token_file, start_session)


def _run(profile_path: Path, bundle, bind, port, token_file, start_session) -> None:
    from cyto_edge.errors import BadInput
    from cyto_edge.runtime.daemon.auth import load_token
    from cyto_edge.runtime.daemon.server import Daemon
    from cyto_edge.runtime.profile import load_profile

    prof = load_profile(profile_path)
    server = prof.server
    if token_file is not None:
        server = server.model_copy(update={"token_file": token_file.expanduser().resolve(), "token_env": None})
    token = load_token(server, source=str(profile_path))
    if bundle is not None and not bundle.exists():
        raise BadInput(f"--bundle {bundle}: no such bundle")
    d = Daemon(prof, bind=bind, port=port, bundle=bundle.resolve() if bundle else None, token=token,
               start_session=start_session)
    try:
        d.start()
    except BaseException:
        d.stop()
        raise
    d.run_forever()
