"""`cyto-edge calibrate`: thresholds chosen on a validation split, written into the manifest, the bundle still
verifies, and the recall they promise is the recall the pipeline then gives."""
from __future__ import annotations

import json
import shutil

import pytest

from cyto_edge.cli import main
from cyto_edge.runtime.bundle import Bundle
from cyto_edge.runtime.decode import PostProcess
from cyto_edge.runtime.evaluate import detect_all, ground_truth, load_dataset
from cyto_edge.runtime.metrics import evaluate_detections
from cyto_edge.runtime.pipeline import build_pipeline


@pytest.fixture
def data_with_val(synth_small, tiny_bundle, tmp_path):
    """A COCO set with a val split whose boxes are what the tiny detector finds (its 4 most confident
    detections per image): the fixture model is trained too briefly to match synth's own labels, and
    calibration needs true positives to choose from."""
    import cv2

    d = tmp_path / "data"
    (d / "val").mkdir(parents=True)
    b = Bundle.open(tiny_bundle)
    pipe = build_pipeline(b, threads=1, camera_um_per_px=1.0, stages=False, count=False, preview_engine=False)
    files = sorted((synth_small / "train").glob("*.jpg"))[:3]
    dets = detect_all(pipe, files, 1.0, PostProcess(score_threshold=0.01, max_detections=500))
    images, anns = [], []
    for i, (f, det) in enumerate(zip(files, dets)):
        (d / "val" / f.name).symlink_to(f)
        h, w = cv2.imread(str(f)).shape[:2]
        images.append({"id": i, "file_name": f.name, "width": w, "height": h})
        for k in det.scores.argsort()[::-1][:4]:
            x1, y1, x2, y2 = (float(v) for v in det.boxes[k])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(det.labels[k]) + 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    cats = [{"id": k + 1, "name": c} for k, c in enumerate(b.classes)]
    (d / "val.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats,
                                            "info": {"um_per_px": 1.0}}))
    return d


def test_calibrate_writes_thresholds_that_reach_the_target(writable_bundle, data_with_val, capsys):
    before = Bundle.open(writable_bundle).manifest.postprocess.class_thresholds
    assert before == {}
    rc = main(["calibrate", str(writable_bundle), "--data", str(data_with_val), "--target-recall", "0.6", "--json",
               "--threads", "1"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    b = Bundle.open(writable_bundle)                                         # re-hashed: verifies
    thr = b.manifest.postprocess.class_thresholds
    changed = {c: r for c, r in res["classes"].items() if r["status"] in ("calibrated", "unreachable")}
    assert any(r["status"] == "calibrated" for r in changed.values()) and set(thr) == set(changed)
    assert all(thr[c] == pytest.approx(r["threshold"]) for c, r in changed.items())
    cal = b.manifest.quality["calibration"]
    assert cal["target_recall"] == 0.6 and cal["split"] == "val" and cal["n_images"] > 0
    # the pipeline with the written thresholds gives (at least) the recall calibrate promised
    ds = load_dataset(data_with_val, "val")
    pipe = build_pipeline(b, threads=1, camera_um_per_px=ds.um_per_px, stages=False, count=False,
                          preview_engine=False)
    pp = b.manifest.postprocess
    dets = detect_all(pipe, [im.file for im in ds.images], pipe.factor,
                      PostProcess(score_threshold=0.01, nms_iou=pp.nms_iou, max_detections=pp.max_detections))
    m = evaluate_detections(ground_truth(ds, b.classes), dets, b.classes, score_threshold=dict(thr), max_dets=None)
    for c, r in changed.items():
        assert m.by_name(c).recall == pytest.approx(r["recall"], abs=1e-9)
        if r["status"] == "calibrated":
            assert m.by_name(c).recall >= 0.6


def test_calibrate_on_test_warns_and_dry_run_writes_nothing(writable_bundle, synth_small, capsys):
    before = (writable_bundle / "manifest.json").read_bytes()
    assert main(["calibrate", str(writable_bundle), "--data", str(synth_small), "--split", "test", "--dry-run",
                 "--classes", "ascus,scc", "--max-images", "2"]) == 0
    err = capsys.readouterr().err
    assert "test split makes its figures optimistic" in err and "not written" in err
    assert (writable_bundle / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("args,msg", [
    (["--split", "train", "--classes", "koilocyte"], "koilocyte"),
    (["--split", "train", "--target-recall", "1.5"], "--target-recall"),
    (["--split", "val"], "no split 'val'"),
])
def test_calibrate_refuses_bad_input(writable_bundle, synth_small, args, msg, capsys):
    assert main(["calibrate", str(writable_bundle), "--data", str(synth_small), "--max-images", "2", *args]) == 2
    assert msg in capsys.readouterr().err


def test_calibrate_refuses_to_write_into_an_archive(writable_bundle, synth_small, tmp_path, capsys):
    archive = shutil.make_archive(str(tmp_path / "b"), "zip", writable_bundle)
    assert main(["calibrate", archive, "--data", str(synth_small), "--split", "train"]) == 2
    assert "unpack the archive" in capsys.readouterr().err
