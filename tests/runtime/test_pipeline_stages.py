"""Second stages in the pipeline: a bundle assembled here with an exported cell classifier and learned FOV
grader; the runtime's crops and cells are those of the training side, and their outputs reach FovResult."""
from __future__ import annotations

import numpy as np
import pytest

from cyto_edge.runtime.bundle import Bundle
from cyto_edge.runtime.grading import policy_from_manifest
from cyto_edge.runtime.pipeline import Pipeline
from cyto_edge.runtime.second_stage import cut_crop, raster_order
from tests.runtime.stage_util import CELLS
from tests.runtime.stage_util import grader_onnx as _grader

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


def _classifier(tmp_path):
    from cyto_edge.export.second_stage import export_classifier
    from cyto_edge.train.cellcrops import CropSet, CropSpec
    from cyto_edge.train.classify import ClassifierSettings, build, checkpoint

    s = ClassifierSettings(arch="small", width=4, img_size=32)
    torch.manual_seed(0)
    crops = CropSet(np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64), ["lsil", "hsil", "normal"],
                    {"lsil": "LSIL", "hsil": "HSIL", "normal": "NILM"}, CropSpec(context=0.25), "test")
    torch.save(checkpoint(build(s, 3).eval(), s, crops, {}), tmp_path / "clf.pt")
    return export_classifier(tmp_path / "clf.pt", tmp_path / "clf.onnx")


@pytest.fixture(scope="module")
def staged(tmp_path_factory, tiny_bundle):
    import shutil

    from cyto_edge.export.second_stage import add_to_bundle

    tmp = tmp_path_factory.mktemp("stages")
    dst = tmp / "staged.cytobundle"
    shutil.copytree(tiny_bundle, dst)
    add_to_bundle(dst, _classifier(tmp))
    grader_onnx, settings = _grader(tmp)
    add_to_bundle(dst, grader_onnx)
    return Bundle.open(dst), settings


def test_crop_geometry_and_raster_order_match_the_training_side(real_frame):
    from cyto_edge.train.cellcrops import CropSpec
    from cyto_edge.train.cellcrops import cut_crop as train_crop
    from cyto_edge.train.cellcrops import raster_order as train_order

    img = real_frame(300, 200)
    rng = np.random.default_rng(0)
    boxes = np.sort(rng.uniform(-20, 320, (40, 4)).astype(np.float32).reshape(40, 2, 2), axis=1).reshape(40, 4)
    boxes = boxes[:, [0, 2, 1, 3]]
    for b in boxes:
        for spec in (CropSpec(context=0.25), CropSpec(context=0.0, fixed_side=37.5)):
            np.testing.assert_array_equal(cut_crop(img, b, 24, spec.context, spec.fixed_side), train_crop(img, b, 24, spec))
    np.testing.assert_array_equal(raster_order(boxes, 32.0), train_order(boxes, 32.0))


def test_second_stages_run_beside_the_rule(staged, blob_engine, draw, real_frame):
    bundle, _ = staged
    pipe = Pipeline(bundle, blob_engine(bundle), policy=policy_from_manifest(bundle), camera_um_per_px=1.0)
    assert pipe.classifier is not None and pipe.grader is not None
    frame = real_frame(640, 480)
    for k, b in enumerate([(100, 100, 150, 150), (300, 200, 350, 260), (500, 350, 560, 400)]):
        draw(frame, b, (3, 2, 3)[k])                                        # hsil, lsil, hsil
    r = pipe.grade(frame, fov_id=7)
    assert r.grade.grade == "HSIL"                                          # the rule, unchanged
    c = r.classified
    assert len(c["index"]) == 3 and set(c["label"]) <= {"lsil", "hsil", "normal"}
    assert all(0 <= p <= 1 for p in c["prob"]) and c["grade"] in ("NILM", "LSIL", "HSIL")
    lg = r.learned_grade
    assert lg["grade"] in ("NILM", "LSIL", "HSIL") and sum(lg["probs"].values()) == pytest.approx(1, abs=1e-3)
    n = lg["n_cells"]
    assert 0 < n <= CELLS["max_cells"] and r.cell_boxes.shape == (n, 4) and r.cell_attention.shape == (n,)
    assert r.cell_attention.sum() == pytest.approx(1, abs=1e-4)
    assert {"classify", "grader"} <= set(r.timings)
    d = r.to_dict(bundle.classes)
    assert d["learned_grade"]["grade"] == lg["grade"] and d["classifier"]["grade"] == c["grade"]


def test_the_learned_grade_equals_the_training_sides_on_the_same_field(staged, blob_engine, real_frame):
    """Cells chosen, cut, ordered and normalized as train-grader does, through the same ONNX file."""
    import onnxruntime as ort

    from cyto_edge.train.cellcrops import CropSpec
    from cyto_edge.train.classify import to_input
    from cyto_edge.train.grade_train import fov_crops, nuclei_boxes

    bundle, s = staged
    frame = real_frame(512, 400)
    pipe = Pipeline(bundle, blob_engine(bundle), policy=policy_from_manifest(bundle), camera_um_per_px=1.0)
    r = pipe.grade(frame)
    boxes = nuclei_boxes(frame, 1.0, s.max_cells, s.window_um)
    crops = fov_crops(frame, boxes, s, CropSpec(context=0.0, fixed_side=s.window_um), "field")
    sess = ort.InferenceSession(str(bundle.model_file("onnx", role="grader")), providers=["CPUExecutionProvider"])
    probs, scores = sess.run(None, {"cells": to_input(crops).numpy()})[:2]
    assert len(scores) == r.learned_grade["n_cells"] > 3
    got = [r.learned_grade["probs"][c] for c in ("NILM", "LSIL", "HSIL")]
    np.testing.assert_allclose(got, probs[0], atol=1e-4)
    np.testing.assert_allclose(r.cell_attention, scores, atol=1e-5)


def test_the_classifier_sees_the_training_sides_crops(staged, blob_engine, draw, real_frame):
    import onnxruntime as ort

    from cyto_edge.train.cellcrops import CropSpec, cut_crop as train_crop
    from cyto_edge.train.classify import to_input

    bundle, _ = staged
    pipe = Pipeline(bundle, blob_engine(bundle), policy=policy_from_manifest(bundle), camera_um_per_px=1.0)
    frame = real_frame(640, 480)
    draw(frame, (200, 150, 260, 220), 3)
    r = pipe.grade(frame)
    rgb = np.ascontiguousarray(frame[..., ::-1])
    crop = train_crop(rgb, r.detections.boxes[0], 32, CropSpec(context=0.25))
    sess = ort.InferenceSession(str(bundle.model_file("onnx", role="classifier")), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"crops": to_input(crop[None]).numpy()})[0][0]
    k = int(ref.argmax())
    assert r.classified["label"] == [["lsil", "hsil", "normal"][k]]
    assert r.classified["prob"][0] == pytest.approx(float(ref[k]), abs=1e-4)
