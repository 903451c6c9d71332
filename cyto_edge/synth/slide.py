"""The synthetic slide: one large field with cell-rich and empty regions, a few abnormal clusters, and the
stop schedule of a moving stage over it (what `synth://` shows).

Files (OUT/slide/ and the cache):
    slide.jpg        the slide, flat-field, sharp and noiseless (the camera adds vignetting, defocus, noise)
    slide.json       parameters, labelled objects [{id, class, bbox [x, y, w, h]}], and every cell and
                     nucleus centre drawn: points.cells / points.nuclei = [[x, y, kind]] with kind
                     0 normal squamous, 1 labelled object, 2 inflammatory
    schedule.json    camera defaults and the stops [{id, x, y, dwell_s, empty, truth}] in slide pixels
                     (x, y = top-left of the camera view)

Rendered slides are cached under $CYTO_EDGE_CACHE (default ~/.cache/cyto-edge)/synth/slide-<key>/,
keyed by every parameter, so opening `synth://` again costs a JPEG decode.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from cyto_edge import __version__
from cyto_edge.errors import BadInput
from cyto_edge.runtime.taxonomy import DEFAULT_CLASSES, DEFAULT_MAPPING, DEFAULT_ORGANISMS, most_severe
from cyto_edge.synth.field import Canvas, plan_field
from cyto_edge.synth.optics import transmit
from cyto_edge.synth.stain import Stain

SLIDE_VERSION = 1      # bump when a slide's content for the same parameters changes (cache key)
LAYOUT_KEY, RENDER_KEY = 0x51DE, 0x9A17
EMPTY_STOP_FRACTION = 0.2


@dataclass(frozen=True)
class SlideParams:
    seed: int = 0
    width: int = 4096
    height: int = 3072
    um_per_px: float = 1.0
    view_w: int = 1280           # camera view the stops are planned for
    view_h: int = 960
    stops: int = 12
    dwell_s: float = 1.5
    move_s: float = 0.6
    fps: float = 30.0
    max_object_px: float = 160.0

    def __post_init__(self):
        if self.view_w > self.width or self.view_h > self.height:
            raise BadInput(f"synth slide: the camera view {self.view_w}x{self.view_h} must fit in the slide "
                           f"{self.width}x{self.height}; lower width/height or enlarge the slide")
        if self.stops < 1 or self.dwell_s <= 0 or self.move_s < 0 or self.fps <= 0:
            raise BadInput("synth slide: stops must be >= 1, dwell > 0, move >= 0, fps > 0")

    @classmethod
    def from_options(cls, opts) -> "SlideParams":
        w, h = opts.slide_width, opts.slide_height
        return cls(seed=opts.seed, width=w, height=h, um_per_px=opts.um_per_px, view_w=min(1280, w // 2),
                   view_h=min(960, h // 2), stops=opts.stops, max_object_px=opts.max_object_px)

    def key(self) -> str:
        blob = json.dumps({"v": SLIDE_VERSION, "renderer": renderer_fingerprint(), **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_RENDERER = ("stain", "shapes", "cells", "lesions", "organisms", "field", "optics", "slide")
_FINGERPRINT: list[str] = []


def renderer_fingerprint() -> str:
    """Hash of the renderer's source: a cached slide is never reused after the drawing code changes."""
    if not _FINGERPRINT:
        h = hashlib.sha256()
        for name in _RENDERER:
            h.update((Path(__file__).parent / f"{name}.py").read_bytes())
        _FINGERPRINT.append(h.hexdigest()[:12])
    return _FINGERPRINT[0]


@dataclass
class Slide:
    image: np.ndarray            # (H, W, 3) uint8 BGR
    params: SlideParams
    objects: list[dict]          # [{id, class, bbox [x, y, w, h]}] slide pixels
    cells: np.ndarray            # (n, 3) float: x, y, kind
    nuclei: np.ndarray           # (m, 3) float: x, y, kind
    schedule: dict               # the schedule.json document
    path: Path | None = None


def stop_positions(p: SlideParams) -> tuple[np.ndarray, set[int]]:
    """(stops, 2) int top-left corners on a serpentine raster with jitter, and the ids of empty stops."""
    rng = np.random.default_rng(np.random.SeedSequence([p.seed, LAYOUT_KEY]))
    span_x, span_y = p.width - p.view_w, p.height - p.view_h
    cols = max(1, int(np.ceil(np.sqrt(p.stops * (span_x + 1) / (span_y + 1)))))
    cols = min(cols, p.stops)
    rows = int(np.ceil(p.stops / cols))
    xs, ys = np.linspace(0, span_x, cols), np.linspace(0, span_y, rows)
    grid = [(xs[c if r % 2 == 0 else cols - 1 - c], ys[r]) for r in range(rows) for c in range(cols)][:p.stops]
    pos = np.asarray(grid, np.float64)
    jit = np.array([min(0.08 * p.view_w, span_x / (2 * cols)), min(0.08 * p.view_h, span_y / (2 * max(rows, 1)))])
    pos += rng.uniform(-1, 1, pos.shape) * jit
    pos = np.clip(np.round(pos), 0, (span_x, span_y)).astype(np.int64)
    n_empty = int(round(EMPTY_STOP_FRACTION * p.stops)) if p.stops >= 3 else 0
    empty = set((1 + rng.permutation(p.stops - 1)[:n_empty]).tolist()) if n_empty else set()
    return pos, empty


def render_slide(p: SlideParams) -> Slide:
    """Draw the slide (a few seconds for 4096x3072)."""
    pos, empty = stop_positions(p)
    rng = np.random.default_rng(np.random.SeedSequence([p.seed, RENDER_KEY]))
    ppu = 1.0 / p.um_per_px
    density = _density_map(rng, p, pos, empty)
    canvas = Canvas(rng, p.width, p.height, ppu, Stain.sample(rng), density=density)
    full = [i for i in range(p.stops) if i not in empty]
    clusters = [pos[i] + (p.view_w / 2, p.view_h / 2) + rng.normal(0, 0.2, 2) * (p.view_w, p.view_h)
                for i in rng.permutation(full)[:max(2, p.stops // 3)]]
    labels, boxes = [], []
    for c in clusters:  # abnormal clusters: 1-2 classes, 2-4 objects each, near a stop
        classes = list(rng.choice(DEFAULT_CLASSES[:6], size=int(rng.integers(1, 3)), replace=False))
        todo = [str(k) for k in classes for _ in range(int(rng.integers(2, 5)))]
        b, lab = canvas.place_labelled(todo, p.max_object_px, where=np.array([c]))
        boxes += b
        labels += lab
    extra = [str(k) for k in rng.choice(DEFAULT_CLASSES, size=int(rng.integers(3, 8)))]
    b, lab = canvas.place_labelled(extra, p.max_object_px)
    boxes, labels = boxes + b, labels + lab
    area_mm2 = p.width * p.height * p.um_per_px ** 2 / 1e6
    plan = replace(plan_field(rng, area_mm2, kind="nilm"), focus=0.0, labelled=[])
    canvas.place_background(plan)
    image = np.empty((p.height, p.width, 3), np.uint8)
    for y in range(0, p.height, 512):  # banded, to keep a single float copy of the slide in memory
        band = transmit(canvas.od[y:y + 512], canvas.brush.stain) * 255.0
        image[y:y + 512] = np.clip(band + 0.5, 0, 255).astype(np.uint8)
    pts = np.asarray(canvas.points, np.float64).reshape(-1, 4)
    objects = [{"id": i, "class": c, "bbox": [round(b[0], 2), round(b[1], 2), round(b[2] - b[0], 2), round(b[3] - b[1], 2)]}
               for i, (c, b) in enumerate(zip(labels, boxes))]
    slide = Slide(image, p, objects, pts[pts[:, 2] == Canvas.CELL][:, [0, 1, 3]],
                  pts[pts[:, 2] == Canvas.NUCLEUS][:, [0, 1, 3]], {})
    slide.schedule = make_schedule(slide, p.view_w, p.view_h, p.stops, p.dwell_s, p.move_s, p.fps)
    return slide


def _density_map(rng: np.random.Generator, p: SlideParams, pos: np.ndarray, empty: set[int]) -> np.ndarray:
    """(gh, gw) 0..1 where normal cells may lie (cell 16 px): smooth patches, zero under empty stops."""
    gh, gw = max(4, p.height // 16), max(4, p.width // 16)
    coarse = rng.random((max(2, gh // 24), max(2, gw // 24))).astype(np.float32)
    d = cv2.resize(coarse, (gw, gh), interpolation=cv2.INTER_CUBIC)
    d = np.clip(0.2 + 1.1 * d, 0.0, 1.0)
    margin = 30.0 / p.um_per_px  # µm: a cell centred outside the view stays outside
    for i in empty:
        x0, y0 = pos[i] - margin
        x1, y1 = pos[i] + (p.view_w + margin, p.view_h + margin)
        d[max(0, int(y0 // 16)):int(np.ceil(y1 / 16)) + 1, max(0, int(x0 // 16)):int(np.ceil(x1 / 16)) + 1] = 0
    return d


def make_schedule(slide: Slide, view_w: int, view_h: int, stops: int, dwell_s: float, move_s: float,
                  fps: float) -> dict:
    """The stop schedule for a camera view over `slide`, with per-stop truth counted from the slide."""
    p = replace(slide.params, view_w=view_w, view_h=view_h, stops=stops, dwell_s=dwell_s, move_s=move_s, fps=fps)
    pos, _ = stop_positions(p)
    out = []
    for i, (x, y) in enumerate(pos.tolist()):
        truth = view_truth(slide, x, y, view_w, view_h)
        out.append({"id": i, "x": int(x), "y": int(y), "dwell_s": float(dwell_s), "empty": truth.pop("empty"),
                    "truth": truth})
    return {"generator": "cyto-edge synth", "version": __version__, "slide": "slide.jpg",
            "width": p.width, "height": p.height, "um_per_px": p.um_per_px,
            "camera": {"width": view_w, "height": view_h, "fps": fps, "move_s": move_s, "dwell_s": dwell_s},
            "stops": out}


def view_truth(slide: Slide, x: float, y: float, w: int, h: int) -> dict:
    """What a camera view with top-left (x, y) shows: grade, organisms, counts, objects (box centre inside)."""
    def inside(a: np.ndarray) -> np.ndarray:
        return (a[:, 0] >= x) & (a[:, 0] < x + w) & (a[:, 1] >= y) & (a[:, 1] < y + h) if len(a) else np.zeros(0, bool)

    cells_in, nuc_in = inside(slide.cells), inside(slide.nuclei)
    ids = [o["id"] for o in slide.objects
           if x <= o["bbox"][0] + o["bbox"][2] / 2 < x + w and y <= o["bbox"][1] + o["bbox"][3] / 2 < y + h]
    classes = [slide.objects[i]["class"] for i in ids]
    return {"empty": not bool(cells_in.any()),
            "fov_grade": most_severe([DEFAULT_MAPPING[c] for c in classes if c not in DEFAULT_ORGANISMS]),
            "organisms": sorted({c for c in classes if c in DEFAULT_ORGANISMS}),
            "squamous_count": int((cells_in & (slide.cells[:, 2] == Canvas.SQUAMOUS)).sum()) if len(cells_in) else 0,
            "nuclei_count": int(nuc_in.sum()), "objects": ids}


def cache_root() -> Path:
    return Path(os.environ.get("CYTO_EDGE_CACHE") or Path.home() / ".cache" / "cyto-edge") / "synth"


def cached_slide_dir(p: SlideParams) -> Path:
    """The directory holding the slide for `p`, rendering it into the cache first when missing."""
    d = cache_root() / f"slide-{p.key()}"
    if (d / "schedule.json").is_file():
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".slide-", dir=d.parent))
    try:
        save_slide(render_slide(p), tmp)
        try:
            os.replace(tmp, d)  # atomic; a concurrent writer of the same key may have won
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def save_slide(s: Slide, d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(d / "slide.jpg"), s.image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    meta = {"generator": "cyto-edge synth", "version": __version__, "key": s.params.key(),
            "params": asdict(s.params), "objects": s.objects,
            "points": {"cells": np.round(s.cells, 1).tolist(), "nuclei": np.round(s.nuclei, 1).tolist()}}
    (d / "slide.json").write_text(json.dumps(meta, separators=(",", ":")) + "\n")
    (d / "schedule.json").write_text(json.dumps(s.schedule, indent=1) + "\n")  # last: marks the dir complete


def load_slide(d: str | Path) -> Slide:
    """Read a written slide directory (OUT/slide or a cache entry)."""
    d = Path(d)
    for name in ("slide.jpg", "slide.json", "schedule.json"):
        if not (d / name).is_file():
            raise BadInput(f"{d / name}: missing; write a slide with `cyto-edge synth OUT --slide` (path=OUT/slide)")
    try:
        meta = json.loads((d / "slide.json").read_text())
        schedule = json.loads((d / "schedule.json").read_text())
        params = SlideParams(**meta["params"])
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{d / 'slide.json'}: not a synth slide ({type(e).__name__}: {e})") from None
    image = cv2.imread(str(d / "slide.jpg"), cv2.IMREAD_COLOR)
    if image is None or image.shape[:2] != (params.height, params.width):
        raise BadInput(f"{d / 'slide.jpg'}: unreadable or not {params.width}x{params.height}")
    pts = meta.get("points", {})
    return Slide(image, params, meta.get("objects", []), np.asarray(pts.get("cells", []), np.float64).reshape(-1, 3),
                 np.asarray(pts.get("nuclei", []), np.float64).reshape(-1, 3), schedule, d)


def write_slide(out: Path, p: SlideParams) -> dict:
    """Copy the (cached) slide for `p` into `out`; returns a summary for synth.json."""
    src = cached_slide_dir(p)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("slide.jpg", "slide.json", "schedule.json"):
        shutil.copyfile(src / name, out / name)
    sched = json.loads((out / "schedule.json").read_text())
    objects = json.loads((out / "slide.json").read_text())["objects"]
    return {"dir": "slide", "key": p.key(), "width": p.width, "height": p.height, "stops": len(sched["stops"]),
            "empty_stops": [s["id"] for s in sched["stops"] if s["empty"]], "objects": len(objects)}
