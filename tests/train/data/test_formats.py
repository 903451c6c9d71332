"""VOC XML, CRIC nucleus points, image-level CSV sets, and format detection."""
from __future__ import annotations

import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.train.data import detect_format, load_detection

VOC_XML = """<annotation>
  <filename>{name}</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  {objects}
</annotation>"""
VOC_OBJ = "<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"


def make_voc(root, build, images, with_size=True):
    """images: [(stem, w, h, [(name, (xmin, ymin, xmax, ymax))])] in Annotations/ + JPEGImages/."""
    (root / "Annotations").mkdir(parents=True)
    for i, (stem, w, h, objs) in enumerate(images):
        build.write_image(root / "JPEGImages" / f"{stem}.jpg", w, h, seed=i)
        xml = VOC_XML.format(name=f"{stem}.jpg", w=w if with_size else 0, h=h if with_size else 0,
                             objects="".join(VOC_OBJ.format(n=n, b=b) for n, b in objs))
        (root / "Annotations" / f"{stem}.xml").write_text(xml)
    return root


def test_voc_one_based_coordinates_and_aliases(tmp_path, build):
    root = make_voc(tmp_path / "voc", build, [
        ("a", 120, 90, [("Trich", (1, 1, 20, 30)), ("ASC-H", (50, 40, 120, 90))]),
        ("b", 100, 100, [("candida", (10, 10, 60, 10))]),  # 1 px tall after conversion: skipped
    ])
    assert detect_format(root) == "voc"
    ds = load_detection(root)
    a, b = ds.images
    assert a.image_id == "a" and (a.width, a.height) == (120, 90)
    np.testing.assert_allclose(a.boxes, [[0, 0, 20, 30], [49, 39, 120, 90]])
    assert [ds.classes[c] for c in a.labels] == ["trichomonas", "asch"]
    assert len(b.boxes) == 0 and len(ds.warnings) == 1 and "b.xml" in ds.warnings[0]


def test_voc_size_from_image_header_and_mixed_weak(tmp_path, build):
    root = make_voc(tmp_path / "voc", build, [("a", 130, 70, [("lsil", (5, 5, 40, 40))])], with_size=False)
    build.write_image(root / "JPEGImages" / "w.png", 64, 48)
    (root / "labels.csv").write_text("file,labels\nw.png,herpes\n")
    ds = load_detection(root)
    assert (ds.images[0].width, ds.images[0].height) == (130, 70)
    weak = ds.images[1]
    assert not weak.boxed and [ds.classes[c] for c in weak.classes_present] == ["herps"]
    assert (weak.width, weak.height) == (64, 48)


def test_voc_xml_beside_images_and_imagesets(tmp_path, build):
    root = tmp_path / "flat"
    for i, stem in enumerate(("x", "y")):
        build.write_image(root / f"{stem}.png", 80, 60, seed=i)
        (root / f"{stem}.xml").write_text(VOC_XML.format(name=f"{stem}.png", w=80, h=60,
                                                         objects=VOC_OBJ.format(n="hsil", b=(10, 10, 30, 30))))
    assert [im.image_id for im in load_detection(root).images] == ["x", "y"]
    voc = make_voc(tmp_path / "voc", build, [("p", 50, 50, []), ("q", 50, 50, [])])
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "test.txt").write_text("q\n")
    assert [im.image_id for im in load_detection(voc, "test").images] == ["q"]


CRIC = """image_id,image_filename,image_doi,cell_id,bethesda_system,nucleus_x,nucleus_y
1,a.png,doi1,10,LSIL,100,80
1,a.png,doi1,11,Negative for intraepithelial lesion,30,30
1,a.png,doi1,12,ASC-H,290,10
2,b.png,doi2,20,Negative for intraepithelial lesion,50,50
3,c.png,doi3,30,HSIL,60,60
3,c.png,doi3,31,SCC,10,110
3,c.png,doi3,32,ASC-US,150,100
"""


def test_cric_points_to_square_boxes(tmp_path, build):
    root = tmp_path / "cric"
    for i, n in enumerate("abc"):
        build.write_image(root / "base" / f"{n}.png", 300, 200 if n != "c" else 120, seed=i)
    (root / "classifications.csv").write_text(CRIC)
    assert detect_format(root) == "cric"
    ds = load_detection(root, point_box_px=40)
    a, b, c = ds.images
    assert (a.image_id, b.image_id, c.image_id) == (1, 2, 3)
    np.testing.assert_allclose(a.boxes, [[80, 60, 120, 100], [270, 0, 300, 30]])  # clipped at the border
    assert [ds.classes[k] for k in a.labels] == ["lsil", "asch"]
    assert len(b.boxes) == 0 and b.boxed  # only negative cells: a boxed image with no boxes
    assert [ds.classes[k] for k in c.labels] == ["hsil", "scc", "ascus"]
    # the side in µm at a given scale: 10 µm at 0.25 µm/px = 40 px
    ds_um = load_detection(root, point_box_um=10, um_per_px=0.25)
    np.testing.assert_allclose(ds_um.images[0].boxes, a.boxes)
    assert ds_um.um_per_px == 0.25
    with pytest.raises(BadInput, match="needs the images' scale"):
        load_detection(root, point_box_um=10)


def test_cric_errors(tmp_path, build):
    root = tmp_path / "cric"
    build.write_image(root / "a.png", 100, 100)
    csv = root / "classifications.csv"
    csv.write_text("image_filename,cell_id,bethesda_system,nucleus_x,nucleus_y\na.png,1,LSIL,150,10\n")
    with pytest.raises(BadInput, match=r"classifications.csv: line 2: nucleus \(150, 10\) lies outside"):
        load_detection(root)
    csv.write_text("image,cell_id,bethesda_system,nucleus_x,nucleus_y\na.png,1,koilocyte,50,10\n")
    with pytest.raises(BadInput, match=r"line 2: bethesda_system: unknown class 'koilocyte'"):
        load_detection(root)
    csv.write_text("image,cell_id,bethesda_system,nucleus_x,nucleus_y\na.png,1,LSIL,50,10\na.png,1,HSIL,5,5\n")
    with pytest.raises(BadInput, match=r"line 3: cell_id: duplicate cell id '1'"):
        load_detection(root)


def test_weak_only_csv_set(tmp_path, build):
    root = tmp_path / "weak"
    for i, n in enumerate(("p.png", "q.png", "r.png")):
        build.write_image(root / "images" / n, 90 + 10 * i, 60, seed=i)
    (root / "labels.csv").write_text('file,labels\np.png,lsil hsil\nq.png,"clue cell"\nr.png,\n')
    assert detect_format(root) == "weak" and detect_format(root / "labels.csv") == "weak"
    ds = load_detection(root)
    assert all(not im.boxed for im in ds.images)
    names = [sorted(ds.classes[c] for c in im.classes_present) for im in ds.images]
    assert names == [["hsil", "lsil"], ["flora"], []]
    assert [im.width for im in ds.images] == [90, 100, 110]


def test_format_detection_errors(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        detect_format(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no dataset found"):
        detect_format(tmp_path / "empty")


def test_split_selection(coco_root, tmp_path, build):
    from cyto_edge.train.data import available_splits

    assert available_splits(coco_root) == ["train", "test"]
    assert len(load_detection(coco_root, "test")) == 4
    with pytest.raises(BadInput, match=r"no split 'val' \(found: train, test\)"):
        load_detection(coco_root, "val")
    root = tmp_path / "weak"
    build.write_image(root / "a.png", 30, 30)
    (root / "labels.csv").write_text("file,labels\na.png,lsil\n")
    assert available_splits(root) == [None]
    assert len(load_detection(root, "train")) == 1  # a set without splits is all train
    with pytest.raises(BadInput, match="has no splits"):
        load_detection(root, "test")
