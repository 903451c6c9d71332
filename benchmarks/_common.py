"""The convention every benchmark follows.

    from _common import emit, parser, timer

    args = parser("What this measures.").parse_args()       # --small, --seeds 0,1,2, --out FILE
    t = timer(lambda: work(), warmup=5, iters=100 if args.small else 1000)
    emit("decode", {"ms_p50": t.p50_ms, "ms_p95": t.p95_ms}, ort_threads=2, model="ssdlite")

`emit` prints ONE JSON line per result with the figures and everything needed to reproduce and compare
them: the exact command, git revision (and whether the tree had uncommitted changes), UTC time, CPU model
and its INT8 flags, cores, thread settings and library versions. Extra keyword arguments whose name ends
in `_threads` are thread settings (onnxruntime, openvino, ...); the others are recorded under "extra".
The line is also appended to $CYTO_EDGE_BENCH_OUT (or `--out`) when set. Ratios between two variants
are measured in one run of one benchmark, never across runs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT_ENV = "CYTO_EDGE_BENCH_OUT"

# module name -> distributions that may provide it (first found wins)
LIBRARIES = {
    "numpy": ("numpy",),
    "cv2": ("opencv-python-headless", "opencv-python", "opencv-contrib-python", "opencv-contrib-python-headless"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
    "openvino": ("openvino",),
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "cyto_edge": ("cyto-edge",),
}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# ------------------------------------------------------------------------------------ provenance

def library_versions() -> dict[str, str | None]:
    """Versions without importing anything new: a loaded module's __version__, else package metadata."""
    out: dict[str, str | None] = {}
    for mod, dists in LIBRARIES.items():
        loaded = sys.modules.get(mod)
        version = getattr(loaded, "__version__", None) if loaded else None
        for d in dists if version is None else ():
            try:
                version = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
        out["opencv" if mod == "cv2" else mod] = version
    return out


@functools.lru_cache(maxsize=1)
def git_state() -> dict:
    """{"revision": sha or None, "dirty": tracked files modified (untracked files ignored)}."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    rev = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if rev else None
    return {"revision": rev, "dirty": bool(status) if status is not None else None}


@functools.lru_cache(maxsize=1)
def cpu() -> dict:
    from cyto_edge.doctor import cpu_info

    info = cpu_info()
    return {"model": info["model"], "arch": info["arch"], "logical_cores": info["logical_cores"],
            "usable_cores": info["usable_cores"], "int8_flags": [k for k, v in info["int8_flags"].items() if v]}


def thread_settings(extra: dict | None = None) -> dict:
    th: dict = {k: os.environ.get(k) for k in THREAD_ENV}
    torch = sys.modules.get("torch")
    if torch is not None:  # never import torch just to ask
        th["torch"] = torch.get_num_threads()
    th.update(extra or {})
    return th


def command_line() -> str:
    return shlex.join([sys.executable, *sys.argv])


def machine() -> dict:
    """What run_all records once per run."""
    import platform

    return {"cpu": cpu(), "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}",
            "git": git_state(), "versions": library_versions(), "threads": thread_settings()}


# ------------------------------------------------------------------------------------------ emit

def emit(name: str, figures: dict, **extra) -> dict:
    """Print one JSON result line (and append it to $CYTO_EDGE_BENCH_OUT); returns the record."""
    threads = {k: extra.pop(k) for k in [k for k in extra if k.endswith("_threads")]}
    record = {
        "benchmark": name,
        "figures": figures,
        "command": command_line(),
        "git": git_state(),
        "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu(),
        "threads": thread_settings(threads),
        "versions": library_versions(),
        "small": bool(_STATE.get("small")),
        "extra": extra,
    }
    line = json.dumps(record, default=_json_default)
    print(line, flush=True)
    out = os.environ.get(OUT_ENV)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(line + "\n")
    return record


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------------------- timer

@dataclass
class Timing:
    p50_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float
    iters: int

    def figures(self, prefix: str = "ms") -> dict:
        """{"<prefix>_p50": .., "<prefix>_p95": .., "<prefix>_mean": ..} rounded to µs."""
        return {f"{prefix}_p50": round(self.p50_ms, 4), f"{prefix}_p95": round(self.p95_ms, 4),
                f"{prefix}_mean": round(self.mean_ms, 4)}

    def as_dict(self) -> dict:
        return asdict(self)


def timer(fn: Callable[[], object], *, warmup: int = 5, iters: int = 100, min_seconds: float = 0.0) -> Timing:
    """Call `fn` `warmup` times untimed, then at least `iters` times (and `min_seconds`); ms statistics."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    a = np.asarray(times)
    return Timing(float(np.percentile(a, 50)), float(np.percentile(a, 95)), float(a.mean()), float(a.min()), len(a))


# ---------------------------------------------------------------------------------------- parser

_STATE: dict = {}


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds wants comma-separated integers, got {text!r}") from None


class BenchParser(argparse.ArgumentParser):
    """parse_args() also applies `--out` (sets $CYTO_EDGE_BENCH_OUT) and remembers `--small` for emit."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns = super().parse_args(args, namespace)
        if ns.out:
            os.environ[OUT_ENV] = str(Path(ns.out).resolve())
        _STATE["small"] = ns.small
        return ns


def parser(description: str) -> BenchParser:
    """The shared command line: --small (the setting run_all uses), --seeds, --out."""
    p = BenchParser(description=description)
    p.add_argument("--small", action="store_true",
                   help="The small setting (minutes, not hours) that benchmarks/run_all.py uses.")
    p.add_argument("--seeds", type=_seeds, default=[0], metavar="0,1,2",
                   help="Comma-separated seeds; figures are reported per seed or as mean/std over them.")
    p.add_argument("--out", default=None, metavar="FILE.jsonl",
                   help=f"Append every result line to FILE (default: ${OUT_ENV} if set).")
    return p
