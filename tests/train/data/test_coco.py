"""COCO reader: CDetector layout, categories by name with aliases, synth's extensions, weak images."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.train.data import load_detection
from cyto_edge.train.data.coco import to_coco


def _by_id(ds):
    return {im.image_id: im for im in ds.images}


def test_categories_mapped_by_name_not_position(coco_root):
    ds = load_detection(coco_root, "train")
    assert ds.classes[:6] == ["ascus", "asch", "lsil", "hsil", "scc", "agc"]
    raw = json.loads((coco_root / "train.json").read_text())
    cat_to_class = {7: "trichomonas", 3: "ascus", 12: "lsil", 5: "hsil"}
    recs = _by_id(ds)
    for a in raw["annotations"]:
        if a["id"] == 999:  # the degenerate box
            continue
        im = recs[a["image_id"]]
        x, y, w, h = a["bbox"]
        hit = np.where(np.all(np.isclose(im.boxes, [x, y, x + w, y + h]), axis=1))[0]
        assert len(hit) == 1
        assert ds.classes[int(im.labels[hit[0]])] == cat_to_class[a["category_id"]]
    assert all(im.boxes.dtype == np.float32 and im.labels.dtype == np.int64 for im in ds.images)


def test_extensions_truth_scale_and_weak(coco_root):
    ds = load_detection(coco_root)  # split None -> train
    assert ds.name == "train" and len(ds) == 16
    assert ds.um_per_px == 0.5
    recs = _by_id(ds)
    assert recs[1001].truth == {"fov_grade": "LSIL", "squamous_count": 31, "focus": 0.9}
    weak = recs[1020]
    assert not weak.boxed and len(weak.boxes) == 0
    assert {ds.classes[c] for c in weak.classes_present} == {"lsil", "trichomonas"}
    assert recs[1021].classes_present == frozenset() and not recs[1021].boxed
    # train_labels.csv: ';' and '|' separated names, aliases; integer ids after the json's (1021)
    a, b = recs[1022], recs[1023]
    assert (a.file.name, b.file.name) == ("csvweak_a.png", "csvweak_b.jpg")
    assert {ds.classes[c] for c in a.classes_present} == {"hsil", "ascus"}
    assert {ds.classes[c] for c in b.classes_present} == {"trichomonas", "lsil"}
    assert (a.width, a.height, b.width, b.height) == (150, 100, 130, 90)  # read from the file headers


def test_degenerate_box_skipped_with_warning(coco_root):
    ds = load_detection(coco_root, "train")
    assert len(ds.warnings) == 1 and "annotations[24]" in ds.warnings[0] and "degenerate" in ds.warnings[0]
    assert ds.class_counts().sum() == 24  # every other box kept
    for im in ds.images:
        if len(im.boxes):
            assert np.all(im.boxes[:, 2:] - im.boxes[:, :2] > 1)


def test_str_ids_and_varying_sizes(tmp_path, build):
    root = tmp_path / "s"
    d = build.coco_dict(root, "train", 6, str_ids=True)
    build.write_json(root / "train.json", d)
    ds = load_detection(root, "train")
    assert {im.image_id for im in ds.images} == {f"img-train-{i}" for i in range(6)}
    assert {(im.width, im.height) for im in ds.images} == {(200, 150), (160, 120), (240, 180)}
    assert ds.class_counts().sum() == sum(1 + i % 3 for i in range(6))


def test_file_name_with_folder_absolute_and_missing_size(tmp_path, build):
    root = tmp_path / "c"
    d = build.coco_dict(root, "train", 3)
    d["images"][0]["file_name"] = "train/" + d["images"][0]["file_name"]
    d["images"][1]["file_name"] = str(root / "train" / d["images"][1]["file_name"])
    del d["images"][2]["width"], d["images"][2]["height"]  # taken from the PNG header
    build.write_json(root / "train.json", d)
    ds = load_detection(root / "train.json")
    assert [im.file.name for im in ds.images] == ["train_000.png", "train_001.png", "train_002.png"]
    assert (ds.images[2].width, ds.images[2].height) == (240, 180)


def test_mapping_file_other_classes_and_ignore(tmp_path, build):
    root = tmp_path / "m"
    root.mkdir()
    build.write_image(root / "train" / "a.png", 100, 80)
    d = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}],
         "categories": [{"id": 1, "name": "Koilo"}, {"id": 2, "name": "superficial"}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                         {"id": 2, "image_id": 1, "category_id": 2, "bbox": [40, 40, 20, 20]}]}
    build.write_json(root / "train.json", d)
    with pytest.raises(BadInput, match=r"categories\[0\]\.name: unknown category 'Koilo'"):
        load_detection(root)
    (tmp_path / "map.yaml").write_text("classes: {koilocyte: LSIL, dyskeratotic: HSIL}\n"
                                       "aliases: {koilo: koilocyte}\nignore: [superficial]\n")
    ds = load_detection(root, mapping=tmp_path / "map.yaml")
    assert ds.classes == ["koilocyte", "dyskeratotic"] and ds.taxonomy.category("koilocyte") == "LSIL"
    assert ds.images[0].labels.tolist() == [0]  # the ignored class is dropped, not an error


def test_to_coco_round_trip(coco_root, tmp_path):
    ds = load_detection(coco_root, "train")
    out = coco_root / "copy.json"
    out.write_text(json.dumps(to_coco(ds, coco_root)))
    again = load_detection(out)
    assert again.fingerprint() == ds.fingerprint()
    assert again.um_per_px == 0.5
    assert _by_id(again)[1002].truth == _by_id(ds)[1002].truth


def test_labels_csv_repeating_weak_images_of_the_json(coco_root):
    """synth lists its weak images both in train.json (image_labels) and in train_labels.csv."""
    csv = coco_root / "train_labels.csv"
    csv.write_text(csv.read_text() + "weak_20.png,lsil;trich\nweak_21.png,\ntrain_001.png,hsil\n")
    ds = load_detection(coco_root, "train")
    assert len(ds) == 16  # nothing added twice
    assert any("train_001.png: image-level labels ignored, the image has boxes" in w for w in ds.warnings)
    csv.write_text("file,labels\nweak_20.png,lsil\n")
    with pytest.raises(BadInput, match=r"train_labels.csv: labels of 'weak_20.png' \(lsil\) differ from its "
                                       r"image_labels in the annotations \(lsil;trichomonas\)"):
        load_detection(coco_root, "train")


def test_other_json_names_find_the_split_folder(coco_root):
    """train.clean.json (synth's exact boxes) has its images in train/, like train.json."""
    d = json.loads((coco_root / "train.json").read_text())
    (coco_root / "train.clean.json").write_text(json.dumps(d))
    from cyto_edge.train.data import available_splits

    assert available_splits(coco_root) == ["train", "test"]  # the named splits only
    ds = load_detection(coco_root, "train.clean")
    assert len(ds) == 14 and ds.images[0].file.parent.name == "train"


def test_fast_and_checked_annotation_paths_agree(coco_root, monkeypatch):
    """Big sets take a numpy path; anything unusual takes the per-annotation path. Same result."""
    from cyto_edge.train.data import coco

    fast = load_detection(coco_root, "train")
    monkeypatch.setattr(coco, "_fast_annotations", lambda *a: False)
    slow = load_detection(coco_root, "train")
    assert fast.fingerprint() == slow.fingerprint()
    assert sorted(fast.warnings) == sorted(slow.warnings)
    for a, b in zip(fast.images, slow.images):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)
