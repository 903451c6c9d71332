"""`cyto-edge bundle info|verify`: what a model bundle holds, and whether it can be trusted (torch-free)."""
from __future__ import annotations

from pathlib import Path

import typer

bundle_app = typer.Typer(help="Inspect and verify model bundles (directories, .zip or .tar).", no_args_is_help=True)


def bundle_summary(b) -> dict:
    """The manifest, summarised: classes, input, output, files with precision and size, quality."""
    m = b.manifest
    q = m.quality or {}
    exp = (m.provenance or {}).get("export", {})
    return {
        "path": str(b.path), "name": m.name, "schema_version": m.schema_version,
        "cyto_edge_version": m.cyto_edge_version,
        "created": m.created, "target": exp.get("target"), "precision": exp.get("precision"),
        "classes": {c: m.bethesda[c] for c in m.classes}, "organisms": list(m.organisms),
        "um_per_px": m.um_per_px,
        "input": {"size": list(m.input.size), "layout": m.input.layout, "color": m.input.color, "scale": m.input.scale,
                  "mean": list(m.input.mean), "std": list(m.input.std), "resize": m.input.resize},
        "output": {"names": m.output.all_names(), "num_priors": m.output.num_priors},
        "postprocess": {"score_threshold": m.postprocess.score_threshold, "nms_iou": m.postprocess.nms_iou,
                        "tile_overlap": m.postprocess.tile.overlap},
        "files": [{"path": f.path, "kind": f.kind, "precision": f.precision, "role": f.role, "size": f.size,
                   **({"meta": {k: v for k, v in f.meta.items() if k in ("opset", "gpu", "tensorrt", "calib_method")}}
                      if f.meta else {})} for f in m.files],
        "quality": {"torch_val_map50": q.get("torch_val_map50"), "gate_passed": (q.get("gate") or {}).get("passed"),
                    "files": {p: {"map50": r.get("map50"), "raw_max_rel_diff": r.get("raw_max_rel_diff") or r.get("raw_rel_diff"),
                                  "matched": r.get("matched"), "passed": r.get("passed")}
                              for p, r in (q.get("files") or {}).items()}},
        "provenance": {k: (m.provenance or {}).get(k) for k in ("checkpoint_sha256", "git_revision",
                                                                 "dataset_fingerprint")},
    }


def _print_info(s: dict, hashes: str) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(f"[bold]{s['name'] or s['path']}[/]  schema {s['schema_version']}, cyto-edge {s['cyto_edge_version']}, "
            f"created {s['created']}; target {s['target'] or '-'} {s['precision'] or ''}; files: {hashes}")
    c.print("classes: " + ", ".join(f"{k} ({v})" for k, v in s["classes"].items()))
    i = s["input"]
    c.print(f"input: {i['size'][0]}x{i['size'][1]} {i['layout']} {i['color']}, x = (pixel * {i['scale']:.6g} - "
            f"mean {i['mean']}) / std {i['std']}; {i['resize']} at {s['um_per_px']} µm/px; "
            f"outputs {', '.join(s['output']['names'])} over {s['output']['num_priors']} priors")
    q = s["quality"]
    t = Table(title=f"files (torch mAP@0.5 {q['torch_val_map50'] if q['torch_val_map50'] is not None else '-'}, "
                    f"export gate {'passed' if q['gate_passed'] else 'FAILED' if q['gate_passed'] is False else '-'})")
    for col in ("path", "kind", "precision", "MB", "mAP@0.5", "raw diff", "gate"):
        t.add_column(col, overflow="fold")
    for f in s["files"]:
        r = q["files"].get(f["path"], {})
        raw = r.get("raw_max_rel_diff")
        t.add_row(f["path"], f["kind"], f["precision"] or "", f"{f['size'] / 1e6:.2f}",
                  "" if r.get("map50") is None else f"{r['map50']:.4f}", f"{max(raw.values()):.1e}" if raw else "",
                  {True: "pass", False: "FAIL"}.get(r.get("passed"), ""))
    c.print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(bundle_app, name="bundle")

    @bundle_app.command("info")
    def bundle_info(path: Path = typer.Argument(..., help="A .cytobundle directory, .zip or .tar."),
                    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")):
        """Summarise a bundle: classes, input, files with precision and size, measured quality."""
        from cyto_edge._cli_util import print_json
        from cyto_edge.runtime.bundle import Bundle, BundleError

        b = Bundle.open(path, verify=False)
        try:
            b.verify()
            hashes = "all sha256 match"
        except BundleError as e:
            hashes = f"NOT verified ({e})"
        s = bundle_summary(b)
        if as_json:
            print_json({**s, "verified": hashes == "all sha256 match"})
        else:
            _print_info(s, hashes)

    @bundle_app.command("verify")
    def bundle_verify(path: Path = typer.Argument(..., help="A .cytobundle directory, .zip or .tar.")):
        """Check a bundle: schema, manifest, every file's sha256, and its export gate.

        Exit 0 when the runtime may use it; 1 with the one-line reason when not.
        """
        from cyto_edge.errors import CheckFailed
        from cyto_edge.runtime.bundle import Bundle, BundleError

        if not Path(path).exists():
            raise BundleError(f"{path}: no such bundle")
        try:
            b = Bundle.open(path, verify=True)
        except BundleError as e:
            raise CheckFailed(str(e)) from None
        gate = (b.manifest.quality or {}).get("gate") or {}
        if gate.get("passed") is False:
            bad = [p for p, r in b.manifest.quality.get("files", {}).items() if not r.get("passed")]
            raise CheckFailed(f"{b.path}: failed its export gate ({', '.join(bad)}); re-export it")
        n = len(b.manifest.files)
        print(f"{b.path}: ok ({n} files, sha256 verified, schema {b.manifest.schema_version}"
              + (", export gate passed)" if gate.get("passed") else ", no export gate recorded)"))
