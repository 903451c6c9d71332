"""The model bundle: the contract between export and the runtime (DESIGN.md, "The model bundle").

A bundle is a directory `<name>.cytobundle/` (or a .zip / .tar of it) holding `manifest.json`, the
model files and `priors.npy`. Everything pre- and post-processing needs is read from the manifest;
nothing is guessed at run time. `Bundle.open` refuses a bundle whose schema, files or hashes do not
match, naming the problem. Writes are atomic (temp file, then rename) and re-hash the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cyto_edge import __version__
from cyto_edge.errors import BadInput, format_validation_error
from cyto_edge.runtime.decode import PostProcess
from cyto_edge.runtime.taxonomy import BETHESDA_ORDER, Taxonomy

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

Precision = Literal["fp32", "fp16", "int8-qdq", "int8"]


class BundleError(BadInput):
    """A bundle that cannot be used: says which file or field is wrong."""


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_M):
    size: tuple[int, int]                      # (H, W) of the model input
    layout: Literal["NCHW"] = "NCHW"
    color: Literal["RGB", "BGR"] = "RGB"
    scale: float = 1.0 / 255.0                 # x = (pixel * scale - mean) / std
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: Literal["tile", "letterbox", "resize"] = "tile"  # tile: native scale, overlapping tiles
    dtype: Literal["float32"] = "float32"


class MilOutputSpec(_M):
    """The optional third output of a detector trained with the MIL head (runtime/rescore.py)."""

    name: str = "mil"                          # (N, P, C+1) per-prior class distribution, column 0 background
    kind: Literal["prior_class_probs"] = "prior_class_probs"
    weight: float = Field(0.5, ge=0, le=1)     # q = (1 - weight) softmax(logits) + weight mil
    topk: int = Field(..., gt=0)               # priors per image scored by the MIL head (the rest copy the SSD's)
    refine_stages: int = Field(..., gt=0)      # OICR stages averaged


class OutputSpec(_M):
    kind: Literal["ssd_raw"] = "ssd_raw"
    names: tuple[str, str] = ("loc", "logits")  # (N, P, 4) offsets, (N, P, C+1) logits, column 0 background
    num_priors: int
    priors_file: str = "priors.npy"            # float32 (P, 4) normalized cx, cy, w, h
    variances: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    mil: MilOutputSpec | None = None           # a third output re-scoring the detections (MIL detector)

    def all_names(self) -> list[str]:
        """The graph outputs an engine returns, in order: loc, logits[, mil]."""
        return [*self.names, *([self.mil.name] if self.mil else [])]


class TileSpec(_M):
    size: int | None = None                    # None: the model input size
    overlap: int = 128                         # px at the model's scale; >= the largest object
    edge_margin: float = 3.0


class PostprocessSpec(_M):
    score_threshold: float = Field(0.3, ge=0, le=1)
    class_thresholds: dict[str, float] = Field(default_factory=dict)  # class name -> threshold
    nms_iou: float = Field(0.45, gt=0, le=1)
    max_detections: int = Field(300, gt=0)
    pre_nms_topk: int = Field(1000, gt=0)
    tile: TileSpec = Field(default_factory=TileSpec)

    def to_postprocess(self, classes: list[str], keep_probs: bool = False) -> PostProcess:
        thr = None
        if self.class_thresholds:
            thr = [float(self.class_thresholds.get(c, self.score_threshold)) for c in classes]
        return PostProcess(score_threshold=self.score_threshold, class_thresholds=thr, nms_iou=self.nms_iou,
                           max_detections=self.max_detections, pre_nms_topk=self.pre_nms_topk,
                           keep_probs=keep_probs)


class GradingSpec(_M):
    min_count: int = Field(1, ge=1)            # k: detections of a category needed to grade it
    category_min_count: dict[str, int] = Field(default_factory=dict)
    organism_min_count: int = Field(1, ge=1)


class FileEntry(_M):
    path: str
    sha256: str
    size: int
    kind: Literal["onnx", "openvino-xml", "openvino-bin", "trt-plan", "priors", "timing-cache", "other"]
    precision: Precision | None = None
    role: str = "detector"                     # detector | classifier | grader | priors
    meta: dict = Field(default_factory=dict)   # e.g. opset, tensorrt version, gpu name


class Manifest(_M):
    schema_version: int = SCHEMA_VERSION
    cyto_edge_version: str = __version__
    task: Literal["detection"] = "detection"
    name: str = ""
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    classes: list[str]
    bethesda: dict[str, str]                   # class -> Bethesda category
    organisms: list[str] = Field(default_factory=list)
    um_per_px: float = Field(..., gt=0)        # the physical scale the model was trained at
    input: InputSpec
    output: OutputSpec
    postprocess: PostprocessSpec = Field(default_factory=PostprocessSpec)
    grading: GradingSpec = Field(default_factory=GradingSpec)
    files: list[FileEntry] = Field(default_factory=list)
    provenance: dict = Field(default_factory=dict)
    quality: dict = Field(default_factory=dict)
    stages: dict = Field(default_factory=dict)  # optional second-stage models: classifier, grader

    @model_validator(mode="after")
    def _check(self):
        if set(self.bethesda) != set(self.classes):
            raise ValueError("bethesda must map exactly the classes")
        for c, cat in self.bethesda.items():
            if cat not in BETHESDA_ORDER:
                raise ValueError(f"bethesda.{c}: {cat!r} is not a Bethesda category")
        for c in self.postprocess.class_thresholds:
            if c not in self.classes:
                raise ValueError(f"postprocess.class_thresholds: unknown class {c!r}")
        return self

    def taxonomy(self) -> Taxonomy:
        return Taxonomy(classes=tuple(self.classes), mapping=dict(self.bethesda), organisms=tuple(self.organisms))

    def file(self, kind: str, precision: str | None = None, role: str = "detector") -> FileEntry | None:
        for f in self.files:
            if f.kind == kind and f.role == role and (precision is None or f.precision == precision):
                return f
        return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_entry(bundle_dir: Path, rel: str, kind: str, precision: str | None = None, role: str = "detector",
               **meta) -> FileEntry:
    p = Path(bundle_dir) / rel
    return FileEntry(path=rel, sha256=sha256_file(p), size=p.stat().st_size, kind=kind, precision=precision,
                     role=role, meta=meta)


def write_manifest(bundle_dir: Path, manifest: Manifest, rehash: bool = True) -> Path:
    """Write manifest.json atomically; with `rehash`, refresh every file's sha256 and size first."""
    bundle_dir = Path(bundle_dir)
    if rehash:
        for f in manifest.files:
            p = bundle_dir / f.path
            f.sha256, f.size = sha256_file(p), p.stat().st_size
    data = json.dumps(manifest.model_dump(mode="json"), indent=2).encode()
    atomic_write_bytes(bundle_dir / MANIFEST, data)
    return bundle_dir / MANIFEST


def _unpack(archive: Path) -> Path:
    """Extract a .zip/.tar(.gz) bundle into a cache dir keyed by the archive's hash; return the bundle dir."""
    key = sha256_file(archive)[:16]
    cache = Path(os.environ.get("CYTO_EDGE_CACHE", Path.home() / ".cache" / "cyto-edge")) / "bundles" / key
    if not (cache / ".complete").exists():
        tmp = Path(tempfile.mkdtemp(prefix="bundle-", dir=cache.parent if cache.parent.exists() else None))
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z:
                    for n in z.namelist():
                        if n.startswith("/") or ".." in Path(n).parts:
                            raise BundleError(f"{archive}: unsafe path {n!r} in archive")
                    z.extractall(tmp)
            elif tarfile.is_tarfile(archive):
                with tarfile.open(archive) as t:
                    t.extractall(tmp, filter="data")
            else:
                raise BundleError(f"{archive}: not a bundle directory, .zip or .tar")
            cache.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(cache, ignore_errors=True)
            os.replace(tmp, cache)
            (cache / ".complete").touch()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    found = [p.parent for p in cache.rglob(MANIFEST)]
    if not found:
        raise BundleError(f"{archive}: no {MANIFEST} inside the archive")
    return min(found, key=lambda p: len(p.parts))


class Bundle:
    """An opened, verified bundle. `path` is the bundle directory."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest
        self._priors: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Bundle":
        p = Path(path)
        if not p.exists():
            raise BundleError(f"{p}: no such bundle")
        if p.is_file():
            p = _unpack(p)
        mpath = p / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{p}: missing {MANIFEST}; not a model bundle")
        try:
            raw = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BundleError(f"{mpath}: unreadable manifest ({e})") from None
        if not isinstance(raw, dict):
            raise BundleError(f"{mpath}: manifest must be a JSON object")
        ver = raw.get("schema_version")
        if ver != SCHEMA_VERSION:
            raise BundleError(f"{mpath}: schema_version {ver!r} is not supported (this cyto-edge reads "
                              f"{SCHEMA_VERSION}); re-export the bundle or upgrade cyto-edge")
        if raw.get("task") not in (None, "detection"):
            raise BundleError(f"{mpath}: task {raw.get('task')!r} is not a detection bundle")
        try:
            manifest = Manifest.model_validate(raw)
        except ValidationError as e:
            raise BundleError(format_validation_error(e, str(mpath))) from None
        b = cls(p, manifest)
        if verify:
            b.verify()
        return b

    def verify(self) -> None:
        """Every listed file present with its size and sha256; raises BundleError naming the first mismatch."""
        for f in self.manifest.files:
            fp = self.path / f.path
            if not fp.is_file():
                raise BundleError(f"{self.path}: missing file {f.path} listed in the manifest")
            if fp.stat().st_size != f.size or sha256_file(fp) != f.sha256:
                raise BundleError(f"{self.path}: {f.path} does not match its sha256 in the manifest "
                                  "(modified or corrupt); re-export the bundle")
        if self.manifest.file("priors", role="priors") is None:
            raise BundleError(f"{self.path}: the manifest lists no priors file")

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.manifest.input.size)  # type: ignore[return-value]

    def priors(self) -> np.ndarray:
        if self._priors is None:
            pri = np.load(self.path / self.manifest.output.priors_file).astype(np.float32)
            if pri.shape != (self.manifest.output.num_priors, 4):
                raise BundleError(f"{self.path}: priors have shape {pri.shape}, manifest says "
                                  f"({self.manifest.output.num_priors}, 4)")
            self._priors = pri
        return self._priors

    def model_file(self, kind: str = "onnx", precision: str | None = None, role: str = "detector") -> Path:
        f = self.manifest.file(kind, precision, role)
        if f is None:
            have = ", ".join(f"{e.path} ({e.kind}, {e.precision})" for e in self.manifest.files if e.role == role)
            raise BundleError(f"{self.path}: no {kind} {precision or ''} {role} file in this bundle; it has: {have}")
        return self.path / f.path

    def rescore_weight(self) -> float | None:
        """The MIL re-scoring weight for `tiling.detect_frame`, None for a two-output detector."""
        return self.manifest.output.mil.weight if self.manifest.output.mil else None

    def postprocess(self, keep_probs: bool = False) -> PostProcess:
        return self.manifest.postprocess.to_postprocess(self.classes, keep_probs)

    def save(self) -> None:
        write_manifest(self.path, self.manifest, rehash=True)
