"""Rich tables for the summaries of `summary.py`."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text


def console() -> Console:
    c = Console()
    return c if c.is_terminal else Console(width=200)


def _fmt(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _title(s: dict) -> str:
    split = f", split {s['split']}" if s.get("split") else ""
    scale = f", {s['um_per_px']:g} µm/px" if s.get("um_per_px") else ", scale unknown (no um_per_px)"
    return (f"{s['root']} ({s['format']}{split}): {s['images']} images ({s['boxed_images']} boxed, "
            f"{s['weak_images']} weak){scale}")


class _Titled:
    """A table with its title on a line of its own (rich wraps a title to the table's width)."""

    def __init__(self, title: str, table: Table):
        self.title, self.table = title, table

    def __rich_console__(self, console, options):
        yield Text(self.title, style="bold")
        yield self.table


def table(title: str, columns: list[str], rows: list[list]) -> _Titled:
    t = Table()
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    return _Titled(title, t)


def _size_columns(um: bool) -> list[tuple[str, str]]:
    cols = [("min_short_side_px", "min short side px"), ("median_side_px", "median side px"),
            ("max_long_side_px", "max long side px")]
    if um:
        cols += [("min_short_side_um", "min short µm"), ("median_side_um", "median µm"), ("max_long_side_um", "max long µm")]
    return cols


def print_check(con: Console, s: dict) -> None:
    con.print(_title(s), markup=False, highlight=False)
    sizes = _size_columns(bool(s.get("um_per_px")))
    cols = ["class", "Bethesda", "boxes", "boxed images", "weak images"] + [h for _, h in sizes]
    rows = [[r["name"], r["category"], r["boxes"], r["boxed_images"], r["weak_images"]] + [r.get(k) for k, _ in sizes]
            for r in s["classes"]]
    total = s["box_sizes"]
    rows.append(["all", "", s["boxes"], s["boxed_images"], s["weak_images"]] + [total.get(k) for k, _ in sizes])
    con.print(table("per class (side = √(w·h); short/long = min/max of w, h)", cols, rows))
    im = s["image_sizes"]
    srows = [[f"{d['width']}x{d['height']}", d["images"]] for d in im["distinct"][:10]]
    if len(im["distinct"]) > 10:
        srows.append([f"… {len(im['distinct']) - 10} more sizes", ""])
    con.print(table(f"image sizes (width {im['min_width']}-{im['max_width']}, height "
                     f"{im['min_height']}-{im['max_height']})", ["width x height", "images"], srows))
    print_warnings(con, s)


def print_warnings(con: Console, s: dict) -> None:
    if s.get("warnings"):
        con.print(f"[yellow]{s['warnings']} warning(s)[/yellow], e.g.:", highlight=False)
        for w in s["warning_examples"][:3]:
            con.print(f"  {w}", highlight=False, markup=False)


def print_classification(con: Console, s: dict) -> None:
    con.print(f"{s['root']} ({s['format']}): {s['cells']} cells in {s['files']} files", markup=False, highlight=False)
    sizes = _size_columns(False)
    rows = [[r["name"], r["category"], r["cells"], r["with_box"]] + [r.get(k) for k, _ in sizes] for r in s["classes"]]
    con.print(table("per class", ["class", "Bethesda", "cells", "with box"] + [h for _, h in sizes], rows))
    print_warnings(con, s)


def print_stats(con: Console, s: dict) -> None:
    con.print(_title(s), markup=False, highlight=False)
    opi = s["objects_per_image"]
    if opi.get("boxed_images"):
        hist = opi["histogram"]
        con.print(table(f"objects per boxed image (mean {opi['mean']:g}, median {opi['median']:g}, max {opi['max']})",
                         ["objects"] + list(hist), [["images"] + list(hist.values())]))
    con.print(f"weak images: {s['weak_images']} ({s['weak_negative_images']} with no class); "
              f"boxed images: {s['boxed_images']}")
    rows = s["box_side_percentiles"]
    if rows:
        keys = [k for k in rows[0] if k.startswith("p")]
        con.print(table("box side √(w·h) percentiles per class", ["class", "boxes"] + keys,
                         [[r["name"], r["boxes"]] + [r[k] for k in keys] for r in rows]))
    truth = s["truth"]
    for key, val in truth.items():
        if key == "images_with_truth" or not isinstance(val, dict):
            continue
        con.print(table(f"truth.{key} ({truth['images_with_truth']} images with truth)",
                         [key, "value"], [[k, v] for k, v in val.items()]))
