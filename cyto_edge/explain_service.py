"""Explanations for devices without torch: the protocol, the file convention, and a stdlib client.

A device (torch-free) stores crops of suspicious cells; a torch-capable host on the network runs

    cyto-edge explain --serve --port 8765 CKPT            (loopback unless --host is given; any other
                                                           bind requires --token)

and the device sends it crops, either one at a time (`request_explanation`) or a whole folder:

    cyto-edge explain --remote http://HOST:8765 --batch /var/lib/cyto-edge/crops     (no torch needed)

or, on the torch-capable host itself, directly over a copy of the store:

    cyto-edge explain CKPT --batch /var/lib/cyto-edge/crops

File convention (what the daemon's gallery links to): the result for a crop `<crop>` (any image file,
e.g. `crops/3/fov-0012-cell-04.jpg`) is stored beside it as

    <crop>.explain.png     the attribution heat map over the crop, same size as the crop (PNG)
    <crop>.explain.json    score, class, baseline, steps and the completeness check

e.g. `crops/3/fov-0012-cell-04.jpg.explain.png`. With `--batch DIR --out OUT` the same names are
written under OUT at the crop's path relative to DIR. A result newer than its crop is up to date and
is not recomputed (unless `--force`). Files ending in `.explain.png` are never treated as crops.

HTTP protocol (JSON errors `{"error": "..."}` with status 400 bad input, 401 bad token, 413 too large):
    GET  /healthz                       {"ok": true, "kind": "classifier"|"detector", "classes": [...], ...}
    POST /explain?box=x1,y1,x2,y2&class=NAME&baseline=black|blur|noise&steps=50&method=trapezoid
         body: the crop's encoded bytes (PNG or JPEG); header `Authorization: Bearer TOKEN` if required
         -> 200 application/json {"overlay_png_base64": "...", "class": ..., "completeness": {...}, ...}
            or, with &format=png, 200 image/png with the same JSON (minus the PNG) in the
            `X-Cyto-Edge-Explanation` header.
This module imports neither torch nor cyto_edge.train, so the device runtime may use it.
"""
from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cyto_edge.errors import BadInput, CheckFailed

RESULT_SUFFIX = ".explain.png"
INFO_SUFFIX = ".explain.json"
CROP_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
MAX_STEPS = 512
HEADER = "X-Cyto-Edge-Explanation"
TOKEN_ENV = "CYTO_EDGE_EXPLAIN_TOKEN"


def result_paths(crop: str | Path, root: str | Path | None = None, out: str | Path | None = None) -> tuple[Path, Path]:
    """(overlay PNG, info JSON) for a crop: beside it, or under `out` at its path relative to `root`."""
    crop = Path(crop)
    base = crop if out is None else Path(out) / crop.relative_to(root or crop.parent)
    return base.with_name(base.name + RESULT_SUFFIX), base.with_name(base.name + INFO_SUFFIX)


def is_result(path: str | Path) -> bool:
    return Path(path).name.endswith(RESULT_SUFFIX)


def find_crops(root: str | Path) -> list[Path]:
    """Every crop image under `root` (recursively), results excluded, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"{root}: --batch must be a folder of crops")
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in CROP_SUFFIXES and not is_result(p))


def up_to_date(crop: Path, png: Path) -> bool:
    return png.is_file() and png.stat().st_mtime >= crop.stat().st_mtime


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """'x1,y1,x2,y2' (pixels of the image) -> a tuple; BadInput naming --box otherwise."""
    if text is None or text == "":
        return None
    try:
        v = tuple(float(s) for s in text.split(","))
    except ValueError:
        v = ()
    if len(v) != 4 or not (v[2] > v[0] and v[3] > v[1]):
        raise BadInput(f"--box {text!r}: give x1,y1,x2,y2 in pixels with x2 > x1 and y2 > y1")
    return v  # type: ignore[return-value]


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_result(png_path: Path, info_path: Path, png: bytes, info: dict) -> None:
    """The info JSON first, then the PNG: a gallery that sees the PNG also finds the JSON."""
    write_atomic(info_path, json.dumps(info, indent=2, default=str).encode())
    write_atomic(png_path, png)


def request_explanation(url: str, image: bytes, *, box=None, class_name: str | None = None,
                        baseline: str = "black", steps: int = 50, method: str = "trapezoid",
                        token: str | None = None, timeout: float = 600.0) -> tuple[bytes, dict]:
    """POST one encoded crop to an explain service -> (overlay PNG bytes, info dict)."""
    q = {"baseline": baseline, "steps": str(steps), "method": method}
    if box is not None:
        q["box"] = ",".join(f"{float(v):g}" for v in box)
    if class_name:
        q["class"] = class_name
    req = urllib.request.Request(url.rstrip("/") + "/explain?" + urllib.parse.urlencode(q), data=image,
                                 method="POST", headers={"Content-Type": "application/octet-stream"})
    token = token or os.environ.get(TOKEN_ENV)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            msg = e.reason
        raise (BadInput if e.code in (400, 401, 413) else CheckFailed)(f"{url}: {e.code} {msg}") from None
    except (urllib.error.URLError, OSError) as e:
        raise CheckFailed(f"{url}: explain service not reachable ({getattr(e, 'reason', e)})") from None
    png = base64.b64decode(body.pop("overlay_png_base64"))
    return png, body


def explain_remote(url: str, crop: str | Path, *, root=None, out=None, paths: tuple[Path, Path] | None = None,
                   **kw) -> tuple[Path, dict]:
    """Send a crop file to the service and store the result by the convention above (or at `paths`)."""
    crop = Path(crop)
    try:
        data = crop.read_bytes()
    except OSError as e:
        raise BadInput(f"{crop}: cannot read the crop ({e.strerror})") from None
    png, info = request_explanation(url, data, **kw)
    info = {"crop": str(crop), "service": url, **info}
    png_path, info_path = paths or result_paths(crop, root, out)
    save_result(png_path, info_path, png, info)
    return png_path, info
