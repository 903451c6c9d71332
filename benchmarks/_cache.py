"""A cache of expensive benchmark artefacts (trained teachers, students, bundles) keyed by config.

    ckpt_dir = cached({"model": "ssdlite", "minutes": 10, "seed": 0},
                      lambda d: train(cfg, out=d / "model.pt"))
    model = ckpt_dir / "model.pt"

The key is the sha256 of the canonical JSON of the config dict plus the cyto-edge version and a hash of
the source that builds that kind of artefact (SOURCES), so a changed recipe, a changed model or loss, or a
new release never reuses a stale artefact. `build_fn(tmp_dir)` writes into a fresh temporary
directory beside the cache entry; on success the directory is renamed into place (atomic on one file
system), so a reader never sees a half-written artefact and a failed build leaves nothing behind. An
exclusive file lock per key makes a second benchmark that asks for the same artefact wait for the first
one instead of building it again. Root: $CYTO_EDGE_CACHE or ~/.cache/cyto-edge/bench.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

CACHE_ENV = "CYTO_EDGE_CACHE"
KEY_FILE = "cache-key.json"


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cyto-edge" / "bench"


def canonical(key_dict: dict) -> str:
    """Canonical JSON: sorted keys, no whitespace; Paths and other objects by str()."""
    return json.dumps(key_dict, sort_keys=True, separators=(",", ":"), default=str)


#: The packages whose source builds each kind of artefact: a change there (a new initialisation, a fixed
#: loss, a different synth drawer) gives new keys, so a stale artefact of the same version is never reused.
SOURCES = {"data": ("synth",), "ckpt": ("train", "synth"), "bundle": ("train", "export", "runtime", "synth")}


def source_hash(packages: tuple[str, ...]) -> str:
    """sha256 over the .py files of cyto_edge/<package> for each package (sorted paths and contents)."""
    import cyto_edge

    root = Path(cyto_edge.__file__).resolve().parent
    h = hashlib.sha256()
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def key_hash(key_dict: dict, kind: str | None = None) -> str:
    from cyto_edge import __version__

    payload = {"cyto_edge": __version__, "key": key_dict}
    if kind in SOURCES:
        payload["source"] = source_hash(SOURCES[kind])
    return hashlib.sha256(canonical(payload).encode()).hexdigest()[:20]


def entry_path(key_dict: dict, kind: str = "ckpt") -> Path:
    return cache_root() / kind / key_hash(key_dict, kind)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cached(key_dict: dict, build_fn: Callable[[Path], None], kind: str = "ckpt") -> Path:
    """The directory holding the artefact for `key_dict`, built by `build_fn(tmp_dir)` on a miss."""
    final = entry_path(key_dict, kind)
    if final.is_dir():
        return final
    with _locked(final.with_name(final.name + ".lock")):
        if final.is_dir():  # another process built it while we waited for the lock
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            build_fn(tmp)
            (tmp / KEY_FILE).write_text(json.dumps({"kind": kind, "key": key_dict}, indent=2, default=str))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def clear(kind: str | None = None) -> None:
    """Remove every cached artefact (of one kind, or all)."""
    target = cache_root() / kind if kind else cache_root()
    shutil.rmtree(target, ignore_errors=True)
