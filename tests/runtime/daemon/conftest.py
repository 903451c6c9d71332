"""Fixtures for the daemon tests: a bundle whose every class is abnormal (so FOVs have suspicious cells,
crops and a gallery even from the briefly trained tiny detector), an in-process daemon on a free port and
`cyto-edge serve` as a process (helpers in daemon_util.py)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.runtime.daemon.daemon_util import ServeProcess


@pytest.fixture(scope="session")
def gallery_bundle(cache_dir, tiny_bundle) -> Path:
    """tiny_bundle with organisms and NILM classes mapped to LSIL, a 0.05 threshold and at most 40 boxes:
    every FOV then has suspicious detections whose crops are stored (the manifest is re-hashed)."""
    from cyto_edge.runtime.bundle import Bundle, write_manifest

    dst = cache_dir / "daemon_gallery.cytobundle"
    if not (dst / "manifest.json").exists():
        tmp = cache_dir / "daemon_gallery.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tiny_bundle, tmp)
        m = Bundle.open(tmp).manifest
        m.bethesda = {c: ("LSIL" if cat == "NILM" else cat) for c, cat in m.bethesda.items()}
        m.organisms = []
        m.postprocess.score_threshold = 0.05
        m.postprocess.max_detections = 40
        write_manifest(tmp, m)
        os.replace(tmp, dst)
    return dst


@pytest.fixture(scope="session")
def graded_bundle(cache_dir, gallery_bundle) -> Path:
    """gallery_bundle with a learned FOV grader (grader.onnx, grades NILM, LSIL, HSIL) as its second stage."""
    from cyto_edge.export.second_stage import add_to_bundle
    from tests.runtime.stage_util import grader_onnx

    dst = cache_dir / "daemon_graded.cytobundle"
    if not (dst / "grader.onnx").exists():
        tmp = cache_dir / "daemon_graded.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(gallery_bundle, tmp)
        work = cache_dir / "daemon_graded.work"
        work.mkdir(exist_ok=True)
        add_to_bundle(tmp, grader_onnx(work)[0])
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    return dst


@pytest.fixture
def make_daemon():
    """Start in-process daemons (profile path -> Daemon on a free port); all are stopped at teardown."""
    from cyto_edge.runtime.daemon.server import Daemon
    from cyto_edge.runtime.profile import load_profile

    started = []

    def make(profile: Path, **kw):
        d = Daemon(load_profile(profile), port=0, **kw)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def serve_process():
    procs = []

    def start(profile: Path, *args: str, env: dict | None = None) -> ServeProcess:
        p = ServeProcess(profile, *args, env=env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
