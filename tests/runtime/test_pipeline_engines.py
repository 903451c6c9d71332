"""Every engine that runs here gives the same detections on the same bundle, through the same pipeline."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cyto_edge.runtime.boxes import iou
from cyto_edge.runtime.decode import PostProcess
from cyto_edge.runtime.grading import policy_from_manifest
from cyto_edge.runtime.pipeline import Pipeline, open_engine

ENGINES = ["onnxruntime", "openvino"]   # tensorrt: on a Jetson (tests/export covers its lint here)


def _available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _detect(bundle, backend, frame, cfg):
    with open_engine(bundle, backend, threads=1) as eng:
        pipe = Pipeline(bundle, eng, policy=policy_from_manifest(bundle), camera_um_per_px=0.8, overlap=96)
        return pipe.detect(frame, cfg=cfg), pipe.grade(frame)


def _same(a, b, margin: float) -> None:
    """Every detection of `a` clear of the score cut by `margin` has its twin in `b`: same class, same box."""
    for x, y in ((a, b), (b, a)):
        sure = np.flatnonzero(x.scores >= x.scores.min() + margin) if len(x) else []
        assert len(sure) > 5
        m = iou(x.boxes[sure], y.boxes)
        j = m.argmax(1)
        assert (m.max(1) > 0.99).all()
        assert (x.labels[sure] == y.labels[j]).all()
        assert np.abs(x.scores[sure] - y.scores[j]).max() < 1e-4


@pytest.mark.filterwarnings("ignore::cyto_edge.runtime.pipeline.ScaleWarning")
@pytest.mark.parametrize("backend", ENGINES[1:])
def test_engines_agree_through_the_pipeline(tiny, real_frame, backend):
    if not _available(backend):
        pytest.skip(f"{backend} is not installed (pip install 'cyto-edge[{backend}]')")
    frame = real_frame(900, 640)
    ref, ref_grade = _detect(tiny, "onnxruntime", frame, None)
    # the tiny fixture model is barely trained: take a threshold that keeps a few dozen detections
    probe = _detect(tiny, "onnxruntime", frame, PostProcess(score_threshold=0.01, max_detections=2000))[0]
    thr = float(np.sort(probe.scores)[::-1][min(60, len(probe) - 1)])
    cfg = PostProcess(score_threshold=thr, max_detections=2000)
    a = _detect(tiny, "onnxruntime", frame, cfg)[0]
    b, grade = _detect(tiny, backend, frame, cfg)
    _same(a, b, margin=1e-4)
    assert grade.grade.grade == ref_grade.grade.grade and len(grade.detections) == len(ref_grade.detections) == len(ref)


@pytest.mark.parametrize("backend", ENGINES)
def test_the_preview_has_its_own_engine_and_never_waits_for_grading(tiny, real_frame, backend):
    """build_pipeline opens a one-thread engine for the preview: it runs while the grading engine is busy."""
    import threading

    if not _available(backend):
        pytest.skip(f"{backend} is not installed")
    from cyto_edge.runtime.pipeline import build_pipeline

    pipe = build_pipeline(tiny, backend=backend, threads=1, camera_um_per_px=1.0)
    assert pipe.preview_engine is not None and pipe.preview_engine is not pipe.engine
    frame = real_frame(640, 480)
    busy = threading.Lock()
    real = pipe.engine.infer
    pipe.engine.infer = lambda x: (busy.acquire(), busy.release(), real(x))[2]   # grading stalls while held
    done = threading.Event()
    with busy, (pipe._lock or threading.Lock()):                  # the grading engine (and its lock) taken
        threading.Thread(target=lambda: (pipe.preview(frame), done.set()), daemon=True).start()
        assert done.wait(30), "the preview waited for the grading engine"
    assert len(pipe.detect(frame)) >= 0
    pipe.close()
    assert build_pipeline(tiny, backend=backend, threads=1, preview_engine=False).preview_engine is None
