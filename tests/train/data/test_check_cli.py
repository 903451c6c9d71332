"""`cyto-edge data check`: tables and JSON on good sets; exit 2 and one line naming file and field on
each kind of broken set."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_check_table(coco_root, run_cli):
    code, out, err = run_cli("data", "check", coco_root)
    assert code == 0, err
    assert "split train): 16 images (12 boxed, 4 weak), 0.5 µm/px" in out
    assert "split test): 4 images (4 boxed, 0 weak)" in out
    rows = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:-1]] for ln in out.splitlines()
            if ln.startswith("│") and ln.split("│")[1].strip() in ("trichomonas", "asch", "all")}
    # last table wins per name: the rows of the train set (printed second) are checked via JSON below
    assert rows["asch"][1:4] == ["0", "0", "0"]
    assert "240x180" in out and "degenerate box 0.5x20.0 px skipped" in out and "OK" in out


def test_check_json(coco_root, run_json):
    res = run_json("data", "check", coco_root, "--split", "train")
    assert res["format"] == "coco" and res["ok"] is True
    (s,) = res["sets"]
    assert (s["images"], s["boxed_images"], s["weak_images"], s["boxes"]) == (16, 12, 4, 24)
    cls = {r["name"]: r for r in s["classes"]}
    assert cls["trichomonas"]["boxes"] == 6 and cls["trichomonas"]["weak_images"] == 2
    assert cls["trichomonas"]["category"] == "NILM"
    assert cls["lsil"]["min_short_side_um"] == pytest.approx(cls["lsil"]["min_short_side_px"] * 0.5)
    assert {(d["width"], d["height"]): d["images"] for d in s["image_sizes"]["distinct"]}[(240, 180)] == 4
    assert s["warnings"] == 1


def test_check_classification_set(tmp_path, build, run_json):
    for cls in ("lsil", "hsil"):
        build.write_image(tmp_path / "cells" / cls / "a.png", 24, 24)
    res = run_json("data", "check", tmp_path / "cells")
    assert res["format"] == "folders"
    assert {r["name"]: r["cells"] for r in res["sets"][0]["classes"]}["hsil"] == 1


def _edit(root, fn):
    d = json.loads((root / "train.json").read_text())
    fn(d)
    (root / "train.json").write_text(json.dumps(d))


def _remove_image(root):
    (root / "train" / "train_003.png").unlink()


def _corrupt_image(root):
    p = root / "train" / "train_004.png"
    p.write_bytes(p.read_bytes()[:200])  # header intact, data truncated


def _corrupt_jpeg(root):
    p = root / "train" / "csvweak_b.jpg"
    p.write_bytes(p.read_bytes()[:300])


def _empty(root):
    (root / "train.json").write_text('{"images": [], "annotations": [], "categories": []}')
    (root / "train_labels.csv").unlink()


BROKEN = {
    "missing image": (_remove_image, ["train.json", "images[3].file_name", "train_003.png", "not found"]),
    "unreadable image": (_corrupt_image, ["train_004.png", "cannot be decoded"]),
    "unreadable jpeg": (_corrupt_jpeg, ["csvweak_b.jpg", "cannot be decoded"]),
    "box outside": (lambda r: _edit(r, lambda d: d["annotations"][0].update(bbox=[190, 10, 30, 20])),
                    ["train.json", "annotations[0].bbox", "outside the image (200x150)"]),
    "negative size": (lambda r: _edit(r, lambda d: d["annotations"][2].update(bbox=[10, 10, -5, 20])),
                      ["train.json", "annotations[2].bbox", "negative size"]),
    "unknown category": (lambda r: _edit(r, lambda d: d["categories"][1].update(name="koilocyte")),
                         ["train.json", "categories[1].name", "unknown category 'koilocyte'"]),
    "unknown weak label": (lambda r: (r / "train_labels.csv").write_text("file,labels\ncsvweak_a.png,lsil;foo\n"),
                           ["train_labels.csv", "line 2", "labels", "unknown class 'foo'"]),
    "duplicate image id": (lambda r: _edit(r, lambda d: d["images"][5].update(id=1002)),
                           ["train.json", "images[5].id", "duplicate image id 1002"]),
    "duplicate annotation id": (lambda r: _edit(r, lambda d: d["annotations"][3].update(id=d["annotations"][1]["id"])),
                                ["train.json", "annotations[3].id", "duplicate annotation id"]),
    "dangling image_id": (lambda r: _edit(r, lambda d: d["annotations"][3].update(image_id=5)),
                          ["train.json", "annotations[3].image_id", "no image with id 5"]),
    "size mismatch": (lambda r: _edit(r, lambda d: d["images"][0].update(width=210)),
                      ["train_000.png", "width/height", "200x150", "210x150"]),
    "empty set": (_empty,  ["train.json: images: the set is empty"]),
    "malformed json": (lambda r: (r / "train.json").write_text('{"images": [\n  {"id": 1,,}\n]}'),
                       ["train.json", "malformed JSON at line 2 column"]),
    "malformed csv": (lambda r: (r / "train_labels.csv").write_text("file,labels\na.png,lsil,extra\n"),
                      ["train_labels.csv", "line 2", "malformed CSV"]),
    "non-numeric bbox": (lambda r: _edit(r, lambda d: d["annotations"][4].update(bbox=["a", 1, 2, 3])),
                         ["train.json", "annotations[4].bbox", "4 numbers"]),
    "null bbox value": (lambda r: _edit(r, lambda d: d["annotations"][4].update(bbox=[None, 1, 2, 3])),
                        ["train.json", "annotations[4].bbox", "non-finite or missing"]),
    "bad width": (lambda r: _edit(r, lambda d: d["images"][2].update(width="wide")),
                  ["train.json", "images[2].width", "positive integer"]),
    "bad um_per_px": (lambda r: _edit(r, lambda d: d["info"].update(um_per_px=-1)),
                      ["train.json", "info.um_per_px"]),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_check_broken_sets_exit_2_one_line(kind, coco_root, run_cli):
    breaker, expected = BROKEN[kind]
    breaker(coco_root)
    code, out, err = run_cli("data", "check", coco_root, "--split", "train")
    assert code == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert "Traceback" not in err + out


def test_check_broken_voc_and_cric(tmp_path, build, run_cli):
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    build.write_image(voc / "JPEGImages" / "a.jpg", 50, 50)
    (voc / "Annotations" / "a.xml").write_text("<annotation><filename>a.jpg</filename>\n<object><name>lsil</name>\n</annotation>")
    code, _, err = run_cli("data", "check", voc)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "a.xml: malformed XML at line 3 column" in err
    cric = tmp_path / "cric"
    build.write_image(cric / "a.png", 60, 60)
    (cric / "classifications.csv").write_text("image_filename,cell_id,bethesda_system,nucleus_x,nucleus_y\n"
                                              "a.png,1,LSIL,abc,10\n")
    code, _, err = run_cli("data", "check", cric)
    assert code == 2 and "classifications.csv: line 2: nucleus_x: must be a number" in err


def test_check_subprocess_no_traceback(coco_root):
    _remove_image(coco_root)
    exe = [sys.executable, "-m", "cyto_edge.cli"]
    r = subprocess.run(exe + ["data", "check", str(coco_root)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "train_003.png" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    _corrupt_jpeg(coco_root)
    (coco_root / "train" / "train_003.png").write_bytes(b"")  # present again, but an empty file
    r = subprocess.run(exe + ["data", "check", str(coco_root), "--split", "train"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr  # decoders' own chatter hidden
    assert "train_003.png: file: cannot be decoded" in r.stderr


def test_broken_test_split_prints_no_table(coco_root, run_cli, tmp_path):
    (coco_root / "test" / "test_001.png").unlink()
    code, out, err = run_cli("data", "check", coco_root)
    assert code == 2 and out == "" and "test.json: images[1].file_name" in err
    bad_map = tmp_path / "map.yaml"
    bad_map.write_text("classes:\n  koilocyte: LSIL\n bad: [\n")
    code, out, err = run_cli("data", "check", coco_root, "--mapping", bad_map)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "map.yaml: malformed class-mapping file at line 3" in err
