"""Bad input to the pipeline: frames converted or refused with one clear line, bundles and profiles refused."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.runtime.bundle import Bundle, BundleError
from cyto_edge.runtime.grading import policy_from_manifest
from cyto_edge.runtime.pipeline import Pipeline, as_frame, build_pipeline


def _pipe(tiny, blob_engine):
    return Pipeline(tiny, blob_engine(tiny), policy=policy_from_manifest(tiny), camera_um_per_px=1.0)


@pytest.mark.parametrize("frame,what", [
    (None, "empty frame"), (np.zeros((0, 0, 3), np.uint8), "empty frame"),
    (np.zeros((40, 40, 2), np.uint8), "unsupported frame shape"), (np.zeros((40, 40, 5), np.uint8), "unsupported frame shape"),
    (np.zeros((4, 40, 40, 3), np.uint8), "unsupported frame shape"), (np.zeros((40, 40, 3), np.int64), "unsupported pixel type"),
    ("not an image", "empty frame"),
])
def test_unusable_frames_are_refused_in_one_line(tiny, blob_engine, frame, what):
    pipe = _pipe(tiny, blob_engine)
    for call in (pipe.grade, pipe.preview, pipe.detect):
        with pytest.raises(BadInput, match=what) as e:
            call(frame)
        assert "\n" not in str(e.value) and "HxW" in str(e.value)


def test_grey_16bit_bgra_and_float_frames_are_converted(tiny, blob_engine, draw, real_frame):
    pipe = _pipe(tiny, blob_engine)
    bgr = real_frame(640, 480)
    draw(bgr, (100, 100, 160, 160), 0)
    grey = bgr.mean(2).astype(np.uint8)
    cases = {"grey": grey, "grey1": grey[..., None], "u16": bgr.astype(np.uint16) << 8,
             "u12": bgr.astype(np.uint16) << 4, "bgra": np.dstack([bgr, np.full(grey.shape, 255, np.uint8)]),
             "float": bgr.astype(np.float32) / 255.0, "strided": bgr[:, ::-1][:, ::-1]}
    for name, f in cases.items():
        img = as_frame(f)
        assert img.shape == (480, 640, 3) and img.dtype == np.uint8, name
        r = pipe.grade(f)
        assert r.frame_shape == (480, 640, 3) and len(r.detections) == 1, name   # the black cell survives
    assert np.array_equal(as_frame(bgr.astype(np.uint16) << 8), bgr)              # 16-bit keeps the 8 top bits


def _edit_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    for dotted, v in changes.items():
        d = m
        *keys, last = dotted.split("__")
        for k in keys:
            d = d[k]
        d[last] = v
    (path / "manifest.json").write_text(json.dumps(m))


def test_a_bundle_for_another_task_or_layout_is_refused(writable_bundle, blob_engine):
    _edit_manifest(writable_bundle, task="segmentation")
    with pytest.raises(BundleError, match="not a detection bundle"):
        Bundle.open(writable_bundle)
    _edit_manifest(writable_bundle, task="detection", input__resize="letterbox")
    b = Bundle.open(writable_bundle)
    with pytest.raises(BundleError, match="input.resize 'letterbox'"):
        Pipeline(b, blob_engine(b), policy=policy_from_manifest(b), camera_um_per_px=1.0)
    _edit_manifest(writable_bundle, input__resize="tile", postprocess__tile__size=256)
    b = Bundle.open(writable_bundle)
    with pytest.raises(BundleError, match="tile.size 256 differs"):
        Pipeline(b, blob_engine(b), policy=policy_from_manifest(b), camera_um_per_px=1.0)


def test_a_profile_naming_classes_the_bundle_lacks_is_refused(tiny, tmp_path, blob_engine):
    from cyto_edge.runtime.profile import load_profile

    p = tmp_path / "p.yaml"
    p.write_text("name: t\ncamera: {kind: synth, um_per_px: 1.0}\nengine: {backend: onnxruntime}\n"
                 f"bundle: {tiny.path}\ngrading: {{class_thresholds: {{koilocyte: 0.4}}}}\n")
    with pytest.raises(BadInput, match="koilocyte"):
        build_pipeline(tiny, profile=load_profile(p), engine=blob_engine(tiny))
    p.write_text(p.read_text().replace("koilocyte", "HSIL"))                 # another spelling of a class: fine
    pipe = build_pipeline(tiny, profile=load_profile(p), engine=blob_engine(tiny))
    assert pipe.policy.class_thresholds["hsil"] == 0.4 and pipe.camera_um_per_px == 1.0


def test_the_profile_sets_engine_scale_and_overlap(tiny, tmp_path):
    from cyto_edge.runtime.profile import load_profile

    p = tmp_path / "p.yaml"
    p.write_text("name: t\ncamera: {kind: synth, um_per_px: 1.05}\nengine: {backend: onnxruntime, threads: 1}\n"
                 f"bundle: {tiny.path}\npipeline: {{tile_overlap_px: 100, batch_size: 3}}\n")
    pipe = build_pipeline(tiny, profile=load_profile(p))
    assert (pipe.overlap, pipe.batch_size, pipe.engine.name) == (100, 3, "onnxruntime")
    assert pipe.factor == pytest.approx(1.05) and not any("rescaled" in w for w in pipe.warnings)   # within 10%
    assert build_pipeline(tiny, profile=load_profile(p), overlap=64).overlap == 64              # options win
