"""Where an artefact came from: git revision, versions."""
from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

from cyto_edge import __version__


@lru_cache(maxsize=1)
def git_revision() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not rev:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    out = {"cyto_edge": __version__}
    import importlib.metadata as md

    for pkg in ("numpy", "opencv-python-headless", "onnxruntime", "openvino", "torch", "torchvision", "onnx"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
