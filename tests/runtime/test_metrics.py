"""runtime/metrics.py agrees with pycocotools' COCOeval, and gives the hand-computed answers."""
import contextlib
import io

import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.runtime.decode import Detections
from cyto_edge.runtime.metrics import (RECALL_POINTS, evaluate_detections, fov_metrics, match_image)
from cyto_edge.runtime.taxonomy import BETHESDA_ORDER


def _random_case(seed: int):
    """Random GT and noisy detections: duplicates, label swaps, ties, empty images, a class without GT."""
    rng = np.random.default_rng(seed)
    C = int(rng.integers(3, 6))
    classes = [f"c{k}" for k in range(C)]
    gt, preds = [], []
    for i in range(int(rng.integers(10, 20))):
        n = 0 if i % 5 == 2 else int(rng.integers(1, 12))  # some images without any GT
        xy = rng.uniform(0, 400, (n, 2))
        wh = rng.uniform(8, 110, (n, 2))
        gb = np.concatenate([xy, xy + wh], 1)
        gl = rng.integers(0, C - 1, n)  # the last class never has GT
        db, ds, dl = [], [], []
        for b, lab in zip(gb, gl):
            for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):  # missed, found, duplicated
                j = rng.normal(0, 0.12, 4) * np.r_[b[2:] - b[:2], b[2:] - b[:2]]
                db.append(b + j)
                dl.append(lab if rng.random() > 0.1 else rng.integers(0, C))
                ds.append(rng.random())
        for _ in range(int(rng.integers(0, 6))):  # false positives, some of the GT-less class
            p = rng.uniform(0, 450, 2)
            db.append(np.r_[p, p + rng.uniform(8, 80, 2)])
            dl.append(rng.integers(0, C))
            ds.append(rng.random())
        ds = np.asarray(ds)
        ds = np.where(rng.random(len(ds)) < 0.4, np.round(ds, 1), ds)  # ties within and across images
        gt.append({"boxes": gb, "labels": gl})
        preds.append(Detections(np.asarray(db, np.float32).reshape(-1, 4), ds.astype(np.float32),
                                np.asarray(dl, np.int64)))
    # one image/class with more than maxDets=100 detections
    xy = rng.uniform(0, 400, (130, 2))
    many = np.concatenate([xy, xy + 30], 1)
    gt.append({"boxes": many[:40], "labels": np.zeros(40, np.int64)})
    preds.append(Detections(many.astype(np.float32), rng.random(130).astype(np.float32), np.zeros(130, np.int64)))
    return classes, gt, preds


def _cocoeval(classes, gt, preds):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ds = {"images": [], "annotations": [], "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)]}
    res = []
    for i, (g, p) in enumerate(zip(gt, preds)):
        ds["images"].append({"id": i + 1, "width": 600, "height": 600})
        for b, lab in zip(g["boxes"], g["labels"]):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            ds["annotations"].append({"id": len(ds["annotations"]) + 1, "image_id": i + 1, "category_id": int(lab) + 1,
                                      "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": 0})
        for b, s, lab in zip(p.boxes.astype(np.float64), p.scores, p.labels):
            res.append({"image_id": i + 1, "category_id": int(lab) + 1, "score": float(s),
                        "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = ds
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_cocoeval(seed):
    pytest.importorskip("pycocotools")
    classes, gt, preds = _random_case(seed)
    ev = _cocoeval(classes, gt, preds)
    ours = evaluate_detections(gt, preds, classes)
    assert abs(ours.map - ev.stats[0]) <= 1e-3
    assert abs(ours.map50 - ev.stats[1]) <= 1e-3
    prec = ev.eval["precision"]  # (T, R, K, A, M)
    for k, c in enumerate(ours.classes):
        ref50 = prec[0, :, k, 0, 2]
        if (ref50 == -1).all():
            assert c.ap50 is None and c.ap is None and c.n_gt == 0
            continue
        assert abs(c.ap50 - ref50.mean()) <= 1e-3
        assert abs(c.ap - prec[:, :, k, 0, 2].mean()) <= 1e-3
        np.testing.assert_allclose(c.pr_precision, ref50, atol=1e-9)
    # COCOeval's recall at IoU 0.5 (all detections up to maxDets) equals ours at a threshold below every score
    low = evaluate_detections(gt, preds, classes, score_threshold=-1.0)
    for k, c in enumerate(low.classes):
        if c.n_gt:
            assert abs(c.recall - ev.eval["recall"][0, k, 0, 2]) <= 1e-9


def test_weak_images_skipped_by_default():
    pytest.importorskip("pycocotools")
    classes, gt, preds = _random_case(11)
    ev = _cocoeval(classes, gt, preds)
    weak_gt = gt + [{"boxes": np.array([[0, 0, 50, 50.0]]), "labels": np.array([0]), "boxed": False}]
    weak_pred = preds + [Detections(np.array([[300, 300, 350, 350]], np.float32), np.array([0.99], np.float32),
                                    np.array([0]))]
    ours = evaluate_detections(weak_gt, weak_pred, classes)
    assert ours.n_weak_skipped == 1 and abs(ours.map - ev.stats[0]) <= 1e-3
    counted = evaluate_detections(weak_gt, weak_pred, classes, include_weak=True)
    assert counted.map < ours.map  # the weak image's unboxed cell and its stray detection now count


def _boxes(n, size=40, step=60):
    x = np.arange(n) * step
    return np.stack([x, x * 0, x + size, x * 0 + size], 1).astype(np.float64)


def test_perfect_detector_scores_one():
    gt = [{"boxes": _boxes(5), "labels": np.array([0, 1, 0, 1, 0])}]
    pred = [(_boxes(5), np.linspace(0.9, 0.5, 5), np.array([0, 1, 0, 1, 0]))]
    m = evaluate_detections(gt, pred, ["a", "b"], score_threshold=0.3)
    assert m.map == pytest.approx(1.0) and m.map50 == pytest.approx(1.0)
    for c in m.classes:
        assert (c.precision, c.recall, c.mean_iou) == (1.0, 1.0, pytest.approx(1.0))


def test_detector_missing_half():
    gt = [{"boxes": _boxes(10), "labels": np.zeros(10, np.int64)}]
    pred = [(_boxes(10)[::2], np.linspace(0.9, 0.5, 5), np.zeros(5, np.int64))]
    c = evaluate_detections(gt, pred, ["a"]).classes[0]
    # precision 1 up to recall 0.5, nothing beyond: 51 of 101 recall points
    assert c.ap50 == pytest.approx(51 / 101) and c.ap == pytest.approx(51 / 101)
    assert c.recall == 0.5 and c.precision == 1.0


def test_false_positive_ranked_first_and_iou_levels():
    gt = [{"boxes": np.array([[0, 0, 100, 100.0]]), "labels": np.array([0])}]
    fp_first = [(np.array([[200, 200, 260, 260], [0, 0, 100, 100.0]]), np.array([0.9, 0.8]), np.array([0, 0]))]
    c = evaluate_detections(gt, fp_first, ["a"]).classes[0]
    assert c.ap50 == pytest.approx(0.5)
    # IoU 0.72 matches at .50 .55 .60 .65 .70 and not above: AP@[.5:.95] = 5/10
    loose = [(np.array([[0, 0, 100, 72.0]]), np.array([0.9]), np.array([0]))]
    c = evaluate_detections(gt, loose, ["a"]).classes[0]
    assert c.ap50 == pytest.approx(1.0) and c.ap == pytest.approx(0.5) and c.mean_iou == pytest.approx(0.72)


def test_class_without_gt_left_out_of_mean_and_f1_threshold():
    gt = [{"boxes": _boxes(4), "labels": np.zeros(4, np.int64)}]
    # ranks: TP .9, TP .8, FP .7, TP .6, FP .5 (one GT missed); class b only has a false positive
    b = np.r_[_boxes(2), [[500, 500, 540, 540.0]], _boxes(3)[2:], [[700, 0, 740, 40.0]], [[900, 0, 940, 40.0]]]
    pred = [(b, np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.95]), np.array([0, 0, 0, 0, 0, 1]))]
    m = evaluate_detections(gt, pred, ["a", "b"], score_threshold={"a": 0.65})
    a, cb = m.classes
    assert cb.ap50 is None and cb.n_gt == 0 and m.map50 == pytest.approx(a.ap50)
    assert (a.precision, a.recall) == (pytest.approx(2 / 3), 0.5)
    # F1 at .8: 2*1*.5/1.5 = .667; at .6: 2*.75*.75/1.5 = .75 (best); at .5: 2*.6*.75/1.35 = .667
    assert a.f1_threshold == pytest.approx(0.6) and a.f1 == pytest.approx(0.75)
    # AP: envelope 1 to recall .5, .75 to recall .75 -> (51 + 25 * .75) / 101
    assert a.ap50 == pytest.approx((51 + 25 * 0.75) / 101)
    d = m.to_dict()
    assert d["classes"]["b"]["ap50"] is None and len(d["classes"]["a"]["pr_curve"]["precision"]) == len(RECALL_POINTS)


def test_matching_takes_best_unmatched_gt():
    g = np.array([[0, 0, 10, 10], [0, 0, 10, 12.0]])
    d = np.array([[0, 0, 10, 11], [0, 0, 10, 10.0]])
    m, iou = match_image(d, g, [0.5])
    assert m.all() and iou[0, 0] == pytest.approx(11 / 12)  # the first took the 12-high box (tie to the later)


def test_bad_inputs_are_named():
    with pytest.raises(BadInput, match="label 3"):
        evaluate_detections([{"boxes": _boxes(1), "labels": [3]}], [None], ["a", "b"])
    with pytest.raises(BadInput, match="prediction entries"):
        evaluate_detections([{"boxes": _boxes(1), "labels": [0]}], [], ["a"])
    with pytest.raises(BadInput, match="unknown classes"):
        evaluate_detections([{"boxes": _boxes(1), "labels": [0]}], [None], ["a"], score_threshold={"z": 0.1})


def test_fov_metrics():
    true = ["NILM", "NILM", "ASC-US", "LSIL", "HSIL", "NILM"]
    pred = ["NILM", "ASC-US", "NILM", "LSIL", "SCC", "NILM"]
    m = fov_metrics(pred, true)
    assert (m.tp, m.fn, m.tn, m.fp) == (2, 1, 2, 1)
    assert m.sensitivity == pytest.approx(2 / 3) and m.specificity == pytest.approx(2 / 3)
    assert m.confusion[BETHESDA_ORDER.index("HSIL")][BETHESDA_ORDER.index("SCC")] == 1
    assert sum(map(sum, m.confusion)) == 6 and m.accuracy == pytest.approx(3 / 6)
    lsil = fov_metrics(pred, true, positive="LSIL")
    assert (lsil.tp, lsil.fn, lsil.tn, lsil.fp) == (2, 0, 4, 0) and lsil.specificity == 1.0
    with pytest.raises(BadInput, match="CIN2"):
        fov_metrics(["CIN2"], ["NILM"])


def test_pr_plots_written(tmp_path):
    from cyto_edge.runtime.plots import PALETTE, _px, write_pr_plots

    cv2 = pytest.importorskip("cv2")
    classes, gt, preds = _random_case(3)
    m = evaluate_detections(gt, preds, classes, score_threshold=0.4)
    paths = write_pr_plots(m, tmp_path / "plots")
    with_gt = [c for c in m.classes if c.n_gt]
    assert [p.name for p in paths] == [f"pr_{c.name}.png" for c in with_gt] + ["pr_all.png"]
    for i, p in enumerate(paths[:-1]):
        img = cv2.imread(str(p))
        assert img is not None and img.shape[2] == 3
        # the curve is drawn in the class colour where the first detection sits (recall 0, precision p0)
        c = with_gt[i]
        (x, y), = _px(np.array([0.0]), c.raw_precision[:1])[:, 0]
        patch = img[max(y - 3, 0):y + 4, x:x + 6].reshape(-1, 3).astype(int)
        assert (np.abs(patch - np.array(PALETTE[i % len(PALETTE)])).sum(1) < 60).any()
    assert cv2.imread(str(paths[-1])).shape == cv2.imread(str(paths[0])).shape


def test_dataset_records_and_per_class_threshold_list():
    from pathlib import Path

    from cyto_edge.train.data.types import ImageRecord

    boxed = ImageRecord(Path("a.jpg"), 200, 100, 1, boxes=_boxes(2).astype(np.float32), labels=np.array([0, 1]))
    weak = ImageRecord(Path("b.jpg"), 200, 100, 2, boxed=False, image_labels=frozenset({0}))
    preds = [Detections(_boxes(2).astype(np.float32), np.array([0.9, 0.4], np.float32), np.array([0, 1])),
             Detections(_boxes(1).astype(np.float32), np.array([0.8], np.float32), np.array([0]))]
    m = evaluate_detections([boxed, weak], preds, ["a", "b"], score_threshold=[0.5, 0.3])
    assert m.n_images == 1 and m.n_weak_skipped == 1 and m.map50 == pytest.approx(1.0)
    assert [c.recall for c in m.classes] == [1.0, 1.0]           # b's 0.4 passes its own 0.3 threshold
    m = evaluate_detections([boxed, weak], preds, ["a", "b"], score_threshold=0.5)
    assert m.by_name("b").recall == 0.0 and m.by_name("b").precision == 0.0
