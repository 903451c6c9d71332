"""`cyto-edge data check|split|stats`: thin commands over `load.py`, `check.py`, `split.py`, `summary.py`."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from cyto_edge.errors import BadInput

PATH_HELP = ("Dataset: a COCO directory (train.json, test.json, train/, test/) or .json file, a VOC "
             "directory (Annotations/, JPEGImages/), a CRIC classifications.csv, a labels.csv of "
             "image-level labels, or a classification set (SIPaKMeD im_<Class>/, or <class>/ folders).")
MAPPING_HELP = ("Class-mapping file (YAML/JSON: classes -> Bethesda category, aliases, ignore) for "
                "datasets whose classes are not the default 11.")
POINT_BOX_HELP = "Side of the square box around a CRIC nucleus point: '100px' (default) or '30um'."


def parse_point_box(text: str | None) -> tuple[float | None, float | None]:
    """'100px' | '100' -> (100, None); '30um' | '30µm' -> (None, 30)."""
    if text is None:
        return None, None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(px|um|µm|μm)?\s*", text)
    if not m:
        raise BadInput(f"--point-box: {text!r} must be a number with px or um, e.g. 100px or 30um")
    value = float(m.group(1))
    return (value, None) if m.group(2) in (None, "px") else (None, value)


def _load_kwargs(mapping, point_box, um_per_px) -> dict:
    px, um = parse_point_box(point_box)
    return {"mapping": mapping, "point_box_px": px, "point_box_um": um, "um_per_px": um_per_px}


def _splits(path: Path, split: Optional[str]) -> list:
    from cyto_edge.train.data.load import available_splits

    return [split] if split is not None or path.is_file() else available_splits(path)


def run_check(path: Path, split, mapping, point_box, um_per_px, as_json: bool) -> None:
    from cyto_edge._cli_util import print_json
    from cyto_edge.train.data import check, load, render, summary

    fmt = load.detect_format(path)
    if fmt in ("sipakmed", "folders"):
        cds = load.load_classification(path, mapping)
        check.verify_items(cds, progress=not as_json)
        sets = [summary.classification_summary(cds, fmt)]
    else:
        sets = []  # every split is checked before anything is printed: a failure is one line
        for s in _splits(path, split):
            ds = load.load_detection(path, s, **_load_kwargs(mapping, point_box, um_per_px))
            check.verify_images(ds, progress=not as_json)
            sets.append(summary.check_summary(ds, fmt))
    if as_json:
        print_json({"path": str(path), "format": fmt, "ok": True, "sets": sets})
    else:
        con = render.console()
        for s in sets:
            (render.print_classification if fmt in ("sipakmed", "folders") else render.print_check)(con, s)
        con.print(f"[green]OK[/green]: {len(sets)} set(s) checked, every image decoded", highlight=False)


def run_stats(path: Path, split, mapping, point_box, um_per_px, as_json: bool) -> None:
    from cyto_edge._cli_util import print_json
    from cyto_edge.train.data import load, render, summary

    fmt = load.detect_format(path)
    if fmt in ("sipakmed", "folders"):
        sets = [summary.classification_summary(load.load_classification(path, mapping), fmt)]
        if not as_json:
            render.print_classification(render.console(), sets[0])
    else:
        sets = [summary.stats_summary(load.load_detection(path, s, **_load_kwargs(mapping, point_box, um_per_px)), fmt)
                for s in _splits(path, split)]
        if not as_json:
            con = render.console()
            for s in sets:
                render.print_stats(con, s)
    if as_json:
        print_json({"path": str(path), "format": fmt, "sets": sets})


def run_split(path: Path, split, val_fraction, seed, mapping, point_box, um_per_px, out, as_json) -> None:
    from cyto_edge._cli_util import print_json
    from cyto_edge.train.data import load, render
    from cyto_edge.train.data.split import write_split

    ds = load.load_detection(path, split, **_load_kwargs(mapping, point_box, um_per_px))
    out_dir = Path(out) if out else (path.parent if path.is_file() else path)
    res = write_split(ds, val_fraction, seed, out_dir)
    if as_json:
        print_json(res)
        return
    con = render.console()
    rows = [[k, c["images"], c["boxed_images"], c["weak_images"], c["boxes"]] for k, c in res["counts"].items()]
    con.print(render.table(f"validation split of {path} (seed {seed}, val fraction {val_fraction:g})",
                            ["split", "images", "boxed", "weak", "boxes"], rows))
    for k, f in res["files"].items():
        con.print(f"wrote {f}", markup=False, highlight=False)


def register(data_app: typer.Typer) -> None:
    path_arg = typer.Argument(..., help=PATH_HELP)
    split_opt = typer.Option(None, "--split", help="Split to use (train, test, val); default: every split.")
    mapping_opt = typer.Option(None, "--mapping", help=MAPPING_HELP, exists=False)
    point_opt = typer.Option(None, "--point-box", help=POINT_BOX_HELP)
    um_opt = typer.Option(None, "--um-per-px", help="The images' scale, when the annotations do not record it.")
    json_opt = typer.Option(False, "--json", help="Print the results as JSON.")

    @data_app.command("check")
    def data_check(path: Path = path_arg, split: Optional[str] = split_opt, mapping: Optional[Path] = mapping_opt,
                   point_box: Optional[str] = point_opt, um_per_px: Optional[float] = um_opt,
                   as_json: bool = json_opt):
        """Validate a dataset (every image decoded); per-class counts, image and box sizes.

        Prints per-class box and image counts, image sizes, box sizes (px, and µm when the scale is
        known). Every image is decoded. Exits 2 with one line naming
        the file and field of the first problem (missing/unreadable image, box outside the image or of
        negative size, unknown class, duplicate id, empty set, malformed JSON/XML/CSV). Boxes of 1 px
        or less are skipped with a warning.

        Example: cyto-edge data check data/cdetector --split train"""
        run_check(path, split, mapping, point_box, um_per_px, as_json)

    @data_app.command("stats")
    def data_stats(path: Path = path_arg, split: Optional[str] = split_opt, mapping: Optional[Path] = mapping_opt,
                   point_box: Optional[str] = point_opt, um_per_px: Optional[float] = um_opt,
                   as_json: bool = json_opt):
        """Describe a dataset: objects per image, box sizes per class, truth, scale.

        Objects per image, box side percentiles per class, weak vs boxed images, the distribution of per-image truth (FOV grade, ...) when recorded, and µm per pixel.

        Example: cyto-edge data stats data/synth --json"""
        run_stats(path, split, mapping, point_box, um_per_px, as_json)

    @data_app.command("split")
    def data_split(path: Path = path_arg,
                   val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share of train images for val."),
                   seed: int = typer.Option(0, "--seed", help="Same seed, same split."),
                   split: Optional[str] = typer.Option(None, "--split", help="Split to carve from (default train)."),
                   mapping: Optional[Path] = mapping_opt, point_box: Optional[str] = point_opt,
                   um_per_px: Optional[float] = um_opt,
                   out: Optional[Path] = typer.Option(None, "--out", help="Folder for the split files (default: beside train.json)."),
                   as_json: bool = json_opt):
        """Carve a seeded validation split from train (writes train/val.split.json).

        Stratified by the rarest class of each image (weak images too); writes train.split.json and val.split.json (COCO) beside train.json.
        Checkpoints are chosen on val, never on test; `--split val` then reads val.split.json.

        Example: cyto-edge data split data/cdetector --val-fraction 0.1 --seed 0"""
        run_split(path, split, val_fraction, seed, mapping, point_box, um_per_px, out, as_json)
