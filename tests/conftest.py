"""Shared fixtures and skip helpers.

Hardware markers (gpu, jetson, picamera) skip with the reason. System tools the tests need (chromium,
ffmpeg) skip when absent on a development machine, but fail in CI, where CYTO_EDGE_REQUIRE_SYSTEM=1
and `.ci/run` has installed them.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def require_binary(name: str, *alternatives: str) -> str:
    for n in (name, *alternatives):
        p = shutil.which(n)
        if p:
            return p
    msg = f"{name} is not installed (apt-get install {name})"
    if os.environ.get("CYTO_EDGE_REQUIRE_SYSTEM") == "1":
        pytest.fail(msg + " but CYTO_EDGE_REQUIRE_SYSTEM=1")
    pytest.skip(msg)


def require_module(name: str, extra: str):
    try:
        return __import__(name)
    except ImportError:
        if os.environ.get("CYTO_EDGE_REQUIRE_SYSTEM") == "1":
            pytest.fail(f"{name} missing (pip install 'cyto-edge[{extra}]')")
        pytest.skip(f"{name} missing (pip install 'cyto-edge[{extra}]')")


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A per-session cache for expensive artefacts (synth sets, trained tiny models)."""
    d = os.environ.get("CYTO_EDGE_TEST_CACHE")
    if d:
        p = Path(d)
        p.mkdir(parents=True, exist_ok=True)
        return p
    return tmp_path_factory.mktemp("cache")
