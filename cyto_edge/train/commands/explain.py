"""`cyto-edge explain`: integrated-gradients heat maps for a classifier or detection score, locally,
over a folder of crops, as an HTTP service, or through a remote service (torch-free)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

HELP = """Integrated-gradients explanation of a classifier or detection score.

\b
  cyto-edge explain CKPT IMAGE [--box x1,y1,x2,y2] [--class NAME] --out overlay.png
  cyto-edge explain CKPT --batch DIR [--out OUT]   every crop -> <crop>.explain.png + .json
  cyto-edge explain CKPT --serve [--port 8765]     HTTP service for devices without torch
  cyto-edge explain --remote URL (IMAGE | --batch DIR)    send crops to such a service

CKPT is a classifier checkpoint (e.g. the RCAN multi-cell classifier) or a detector checkpoint. For a classifier the score is the probability of --class (default: the predicted class); for a detector it is the score of the detection that best matches --box (default: the top detection).

The completeness check (sum of attributions = score(image) - score(baseline)) is printed; raise --steps when its relative error is large (Sundararajan et al. suggest within 5%).

Results beside a crop are named <crop>.explain.png and <crop>.explain.json; the daemon's gallery links to them.
"""


def _print_one(res: dict, as_json: bool) -> None:
    from cyto_edge._cli_util import print_json

    if as_json:
        return print_json(res)
    c = res["completeness"]
    score = res.get("detection_score", c["score"])
    typer.echo(f"{res['kind']} {res.get('arch')}: class {res['class']} score {score:.4f}")
    typer.echo(f"completeness ({c['baseline']} baseline, {c['steps']} steps, {c['method']}): "
               f"sum of attributions {c['sum_attributions']:.6g}, score(x) - score(baseline) "
               f"{c['score_difference']:.6g}, relative error {c['relative_error']:.2%}")
    if "overlay" in res:
        typer.echo(f"overlay: {res['overlay']}")


def _serve(explainer, host: str, port: int, token: Optional[str]) -> None:
    import signal

    from cyto_edge.train.explain_server import make_server

    server = make_server(explainer, host, port, token)
    h, p = server.server_address[:2]
    typer.echo(f"explain service for {explainer.path.name} ({explainer.kind}) on http://{h}:{p} "
               f"(POST /explain, GET /healthz); Ctrl-C to stop")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        typer.echo(f"stopped after {server.explained} explanation(s)")


def _progress(total: int, label: str):
    from rich.progress import Progress

    prog = Progress(transient=True)
    task = prog.add_task(label, total=total)
    return prog, lambda: prog.advance(task)


def _run_remote(url: str, args: list[str], batch: Optional[Path], out: Optional[Path], force: bool, opts: dict,
                as_json: bool) -> None:
    from cyto_edge._cli_util import print_json
    from cyto_edge.errors import BadInput
    from cyto_edge.explain_service import explain_remote, find_crops, result_paths, up_to_date

    if batch is None:
        if len(args) != 1:
            raise BadInput("with --remote give one IMAGE or --batch DIR (the checkpoint lives on the service)")
        paths = (Path(out), Path(out).with_suffix(".json")) if out is not None else None
        png, info = explain_remote(url, args[0], paths=paths, **opts)
        return _print_one({**info, "overlay": str(png)}, as_json)
    crops = find_crops(batch)
    summary = {"crops": len(crops), "explained": 0, "up_to_date": 0, "failed": []}
    prog, tick = _progress(len(crops), "explaining (remote)")
    with prog:
        for crop in crops:
            if not force and up_to_date(crop, result_paths(crop, batch, out)[0]):
                summary["up_to_date"] += 1
            else:
                try:
                    explain_remote(url, crop, root=batch, out=out, **opts)
                    summary["explained"] += 1
                except BadInput as e:
                    summary["failed"].append({"crop": str(crop), "reason": str(e)})
            tick()
    print_json(summary) if as_json else typer.echo(
        f"{summary['explained']} explained, {summary['up_to_date']} up to date, {len(summary['failed'])} failed")


def register(app: typer.Typer) -> None:
    @app.command("explain", help=HELP)
    def _cmd(
        args: List[str] = typer.Argument(None, metavar="CKPT [IMAGE]", show_default=False,
                                         help="Checkpoint and image (with --remote: the image only)."),
        box: Optional[str] = typer.Option(None, "--box", help="x1,y1,x2,y2 pixels: explain the detection best matching it."),
        class_name: Optional[str] = typer.Option(None, "--class", help="Class to explain (default: predicted / top)."),
        baseline: str = typer.Option("black", "--baseline", help="black | blur | noise: the reference image x'."),
        steps: int = typer.Option(50, "--steps", min=1, max=512, help="Points on the path from baseline to image."),
        method: str = typer.Option("trapezoid", "--method", help="trapezoid | riemann | midpoint quadrature."),
        score: str = typer.Option("prob", "--score", help="Classifier score: prob (softmax) or logit."),
        out: Optional[Path] = typer.Option(None, "--out", help="Overlay PNG (one image) or output folder (--batch); "
                                                               "default: beside the image as <image>.explain.png."),
        batch: Optional[Path] = typer.Option(None, "--batch", help="Explain every crop under this folder."),
        force: bool = typer.Option(False, "--force", help="--batch: recompute results that are up to date."),
        serve: bool = typer.Option(False, "--serve", help="Run the HTTP explain service for CKPT."),
        host: str = typer.Option("127.0.0.1", "--host", help="--serve: bind address (non-loopback needs --token)."),
        port: int = typer.Option(8765, "--port", help="--serve: TCP port."),
        token: Optional[str] = typer.Option(None, "--token", envvar="CYTO_EDGE_EXPLAIN_TOKEN",
                                            help="Bearer token the service requires / the client sends."),
        remote: Optional[str] = typer.Option(None, "--remote", help="URL of an explain service (no torch needed)."),
        max_rel_error: Optional[float] = typer.Option(None, "--max-rel-error",
                                                      help="Exit 1 when the completeness relative error exceeds this."),
        seed: int = typer.Option(0, "--seed", help="Seed of the noise baseline."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ):
        from cyto_edge.errors import BadInput, CheckFailed
        from cyto_edge.explain_service import parse_box

        args = list(args or [])
        opts = dict(box=parse_box(box), class_name=class_name, baseline=baseline, steps=steps, method=method)
        for name, val, allowed in (("--baseline", baseline, ("black", "blur", "noise")),
                                   ("--method", method, ("trapezoid", "riemann", "midpoint")),
                                   ("--score", score, ("prob", "logit"))):
            if val not in allowed:
                raise BadInput(f"{name} {val!r}: choose one of {', '.join(allowed)}")
        if remote:
            return _run_remote(remote, args, batch, out, force, {**opts, "token": token}, as_json)
        if not args:
            raise BadInput("give a checkpoint: cyto-edge explain CKPT IMAGE (see --help)")
        wants_image = not (serve or batch)
        if len(args) != (2 if wants_image else 1):
            raise BadInput("usage: explain CKPT IMAGE | explain CKPT --batch DIR | explain CKPT --serve")
        from cyto_edge.train.explain_targets import Explainer, explain_folder

        explainer = Explainer(args[0])
        if serve:
            return _serve(explainer, host, port, token)
        opts.update(score=score, seed=seed)
        if batch is not None:
            from cyto_edge.explain_service import find_crops

            prog, tick = _progress(len(find_crops(batch)), "explaining")
            with prog:
                summary = explain_folder(explainer, batch, out, force=force, progress=tick, **opts)
            _print_batch(summary, as_json)
            rel = summary["max_relative_error"]
        else:
            rel = _explain_one(explainer, Path(args[1]), out, opts, as_json)
        if max_rel_error is not None and rel > max_rel_error:
            raise CheckFailed(f"completeness relative error {rel:.2%} exceeds --max-rel-error {max_rel_error:.2%}; "
                              "raise --steps")


def _explain_one(explainer, image: Path, out: Optional[Path], opts: dict, as_json: bool) -> float:
    from cyto_edge.explain_service import result_paths, save_result
    from cyto_edge.train.explain import encode_png, read_rgb

    ex = explainer.explain(read_rgb(image), **opts)
    png_path, info_path = result_paths(image)
    if out is not None:
        png_path, info_path = Path(out), Path(out).with_suffix(".json")
    res = {"image": str(image), "checkpoint": str(explainer.path), **ex.to_json()}
    save_result(png_path, info_path, encode_png(ex.overlay), res)
    _print_one({**res, "overlay": str(png_path)}, as_json)
    return ex.ig.relative_error


def _print_batch(summary: dict, as_json: bool) -> None:
    from cyto_edge._cli_util import print_json

    if as_json:
        return print_json(summary)
    typer.echo(f"{summary['explained']} explained, {summary['up_to_date']} up to date, "
               f"{len(summary['failed'])} failed; largest completeness relative error "
               f"{summary['max_relative_error']:.2%}")
    for f in summary["failed"][:10]:
        typer.echo(f"  skipped {f['reason']}")
