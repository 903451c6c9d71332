from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def synth_cache(tmp_path_factory):
    """Slides rendered by these tests go to a private cache, never to ~/.cache."""
    old = os.environ.get("CYTO_EDGE_CACHE")
    d = tmp_path_factory.mktemp("synth-cache")
    os.environ["CYTO_EDGE_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("CYTO_EDGE_CACHE", None)
    else:
        os.environ["CYTO_EDGE_CACHE"] = old
