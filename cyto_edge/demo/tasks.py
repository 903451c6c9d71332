"""Two demo steps that need more than one command line, run as `python -m cyto_edge.demo.tasks TASK`.

evaluate   `cyto-edge eval` of the bundle, through the runtime, with the precision the demo runs
           (runtime.evaluate.evaluate_bundle_cli): metrics.json and the PR-curve PNGs.
report     the screening daemon (the same Daemon as `cyto-edge serve`) on the demo's profile: it opens
           a slide session, grades one pass of the synth:// moving stage into its SQLite store, closes
           the session, and the report page is fetched from its web server and saved as a standalone
           HTML file (style sheet and cell crops inlined). The session (summary, FOVs, gallery) is also
           saved as JSON. Torch-free, like the device.
"""
from __future__ import annotations

import base64
import json
import re
import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


@app.command("evaluate")
def evaluate(bundle: Path, data: Path = typer.Option(...), split: str = typer.Option("test"),
             out: Path = typer.Option(...), precision: str = typer.Option("fp32"),
             threads: Optional[int] = typer.Option(None), max_images: Optional[int] = typer.Option(None)):
    """Box-level evaluation of BUNDLE on a split: metrics.json and PR curves in OUT."""
    from cyto_edge.runtime.evaluate import evaluate_bundle_cli

    evaluate_bundle_cli(bundle, data, split=split, out=out, precision=precision, threads=threads,
                        max_images=max_images)


@app.command("report")
def report(profile: Path = typer.Option(...), html: Path = typer.Option(...),
           json_out: Path = typer.Option(..., "--json"), slide_id: str = typer.Option("DEMO-SLIDE"),
           timeout: float = typer.Option(600.0)):
    """One pass of the profile's synth:// slide through the daemon; the report page saved to HTML."""
    from cyto_edge.runtime.daemon import logs
    from cyto_edge.runtime.daemon.server import Daemon
    from cyto_edge.runtime.profile import load_profile

    logs.setup("text", "info")
    d = Daemon(load_profile(profile), port=0, start_session=slide_id)
    d.start()
    try:
        session = _grade_one_pass(d, timeout)
    finally:
        d.stop()
    html.write_text(session.pop("html"))
    json_out.write_text(json.dumps(session, indent=2, default=str))
    print(f"report: {html} ({session['summary']['n_fovs']} FOVs, worst grade {session['summary']['worst_grade']})")


class _Http:
    """A few GET / POST requests to the daemon on loopback (the standard library: no extra dependency)."""

    def __init__(self, base: str):
        self.base = base

    def request(self, path: str, method: str = "GET") -> bytes:
        import urllib.request

        req = urllib.request.Request(self.base + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=60) as r:     # raises HTTPError on 4xx / 5xx
            return r.read()

    def json(self, path: str, method: str = "GET"):
        return json.loads(self.request(path, method))


def _grade_one_pass(d, timeout: float) -> dict:
    """Wait until the source has ended once (its FOVs graded and stored), close the session, read it back."""
    from cyto_edge.errors import CheckFailed

    svc, c = d.service, _Http(d.url)
    sid = c.json("/api/sessions/current")["id"]
    seen_runner, t0 = False, time.monotonic()
    while True:
        seen_runner = seen_runner or svc.runner is not None
        if seen_runner and svc.runner is None and svc.camera_state == "ended":
            break
        if svc.engine_state == "error":
            raise CheckFailed(f"the daemon cannot load the bundle: {svc.engine_error}")
        if time.monotonic() - t0 > timeout:
            raise CheckFailed(f"the slide was not graded within {timeout:.0f} s")
        time.sleep(0.05)
    c.json(f"/api/sessions/{sid}/stop", "POST")       # before the source reopens and grades a second pass
    page = c.request(f"/sessions/{sid}/report").decode()
    out = c.json(f"/api/sessions/{sid}")
    out["fovs"] = c.json(f"/api/sessions/{sid}/fovs?limit=1000")["fovs"]
    out["gallery"] = c.json(f"/api/sessions/{sid}/gallery?n=12")["cells"]
    out["html"] = standalone(page, c)
    out["url_path"] = f"/sessions/{sid}/report"
    out["graded_in_pass"] = svc.totals["fovs_graded"]
    out["unsaved"] = svc.fovs_unsaved
    return out


def standalone(page: str, client: _Http) -> str:
    """The page with its style sheet and images inlined and its links to other pages removed, so that the
    file opens anywhere."""
    def style(m: re.Match) -> str:
        return f"<style>\n{client.request(m.group(1)).decode()}\n</style>"

    def image(m: re.Match) -> str:
        try:
            data = client.request(m.group(1))
        except OSError:          # a crop deleted by retention: the page shows an empty image
            return 'src=""'
        return f'src="data:image/jpeg;base64,{base64.b64encode(data).decode()}"'

    page = re.sub(r'<link rel="stylesheet" href="(/static/[^"]+)">', style, page)
    page = re.sub(r'src="(/api/[^"]+)"', image, page)
    return re.sub(r'\shref="/[^"]*"', "", page)


def main(argv: list[str] | None = None) -> int:
    from cyto_edge.errors import CytoError

    try:
        app(args=argv, standalone_mode=False, prog_name="cyto_edge.demo.tasks")
    except CytoError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
