"""`cyto-edge data stats`: objects per image, box sides per class, weak vs boxed, truth, scale."""
from __future__ import annotations

import numpy as np

from cyto_edge.train.data import load_detection


def test_stats_json(coco_root, run_json):
    res = run_json("data", "stats", coco_root, "--split", "train")
    (s,) = res["sets"]
    assert (s["images"], s["boxed_images"], s["weak_images"], s["weak_negative_images"]) == (16, 12, 4, 1)
    assert s["um_per_px"] == 0.5
    opi = s["objects_per_image"]
    # coco_dict: image i has 1 + i % 3 boxes; image 0 lost its degenerate extra box (it was skipped)
    assert opi["histogram"] == {"0": 0, "1": 4, "2-5": 8, "6-10": 0, "11-20": 0, ">20": 0}
    assert opi["max"] == 3 and opi["mean"] == 2.0
    ds = load_detection(coco_root, "train")
    lsil = ds.classes.index("lsil")
    wh = np.concatenate([im.boxes[im.labels == lsil, 2:] - im.boxes[im.labels == lsil, :2] for im in ds.images])
    row = {r["name"]: r for r in s["box_side_percentiles"]}["lsil"]
    assert row["boxes"] == len(wh)
    assert row["p50_px"] == round(float(np.median(np.sqrt(wh[:, 0] * wh[:, 1]))), 2)
    assert abs(row["p50_um"] - row["p50_px"] * 0.5) < 0.01
    assert s["truth"]["fov_grade"] == {"NILM": 4, "ASC-US": 4, "LSIL": 4}  # Bethesda severity order
    assert list(s["truth"]["fov_grade"]) == ["NILM", "ASC-US", "LSIL"]
    assert s["truth"]["squamous_count"] == {"min": 30, "mean": 35.5, "max": 41}
    assert s["truth"]["images_with_truth"] == 12


def test_stats_table(coco_root, run_cli):
    code, out, err = run_cli("data", "stats", coco_root)
    assert code == 0, err
    assert "objects per boxed image (mean 2, median 2, max 3)" in out
    assert "weak images: 4 (1 with no class); boxed images: 12" in out
    assert "truth.fov_grade (12 images with truth)" in out
    assert out.count("µm/px") == 2  # train and test


def test_stats_cric_in_um(tmp_path, build, run_json):
    root = tmp_path / "cric"
    build.write_image(root / "a.png", 200, 200)
    (root / "classifications.csv").write_text("image_filename,cell_id,bethesda_system,nucleus_x,nucleus_y\n"
                                              "a.png,1,LSIL,100,100\na.png,2,HSIL,50,50\n")
    res = run_json("data", "stats", root, "--point-box", "15um", "--um-per-px", "0.5")
    rows = {r["name"]: r for r in res["sets"][0]["box_side_percentiles"]}
    assert rows["lsil"]["p50_px"] == 30.0 and rows["lsil"]["p50_um"] == 15.0
