"""Classification sets: SIPaKMeD layout (polygons -> boxes, crops) and plain class folders."""
from __future__ import annotations

import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.train.data import detect_format, load_classification


def _dat(path, pts):
    path.write_text("".join(f"{x:.7e},{y:.7e}\n" for x, y in pts))


def make_sipakmed(root, build):
    """Dyskeratotic: 2 fields with 2 + 1 polygon cells (nested im_X/im_X as the archive unpacks);
    Koilocytotic: 1 field, 1 cell; Parabasal: crops only."""
    dys = root / "im_Dyskeratotic" / "im_Dyskeratotic"
    build.write_image(dys / "001.bmp", 200, 150, seed=1)
    _dat(dys / "001_cyt01.dat", [(10.5, 20.25), (60.0, 18.0), (55.0, 70.75), (12.0, 66.0)])
    _dat(dys / "001_nuc01.dat", [(30, 40), (40, 40), (35, 50)])
    _dat(dys / "001_cyt02.dat", [(100, 100), (150, 100), (150, 149), (100, 149)])
    build.write_image(dys / "002.bmp", 120, 100, seed=2)
    _dat(dys / "002_cyt01.dat", [(5, 5), (40, 5), (40, 30)])
    build.write_image(dys / "CROPPED" / "001_01.bmp", 50, 50)
    koi = root / "im_Koilocytotic"
    build.write_image(koi / "007.bmp", 160, 160, seed=3)
    _dat(koi / "007_cyt01.dat", [(20, 30), (90, 30), (90, 95)])
    par = root / "im_Parabasal" / "CROPPED"
    for i in range(3):
        build.write_image(par / f"00{i}_01.bmp", 40 + i, 40, seed=i)
    return root


def test_sipakmed_polygons_to_boxes(tmp_path, build):
    root = make_sipakmed(tmp_path / "sip", build)
    assert detect_format(root) == "sipakmed"
    ds = load_classification(root)
    assert ds.classes == ["dyskeratotic", "koilocytotic", "metaplastic", "parabasal", "superficial_intermediate"]
    assert ds.taxonomy.category("koilocytotic") == "LSIL"
    by_id = {(ds.classes[it.label], it.cell_id): it for it in ds.items}
    cell = by_id[("dyskeratotic", "001_01")]
    assert cell.file.name == "001.bmp"
    np.testing.assert_allclose(cell.box, [10.5, 18.0, 60.0, 70.75])
    np.testing.assert_allclose(by_id[("dyskeratotic", "001_02")].box, [100, 100, 150, 149])
    np.testing.assert_allclose(by_id[("koilocytotic", "007_01")].box, [20, 30, 90, 95])
    crops = [it for it in ds.items if ds.classes[it.label] == "parabasal"]
    assert len(crops) == 3 and all(it.box is None for it in crops)
    assert ds.class_counts().tolist() == [3, 1, 0, 3, 0]  # cells preferred to crops where polygons exist
    crops_only = load_classification(root, source="crops")
    assert crops_only.class_counts().tolist() == [1, 0, 0, 3, 0]


def test_sipakmed_bad_polygon(tmp_path, build):
    root = make_sipakmed(tmp_path / "sip", build)
    bad = root / "im_Koilocytotic" / "007_cyt01.dat"
    bad.write_text("1.0,2.0\n3.0;oops\n5,6\n")
    with pytest.raises(BadInput, match=r"007_cyt01.dat: line 2: malformed polygon point"):
        load_classification(root)
    bad.write_text("1,2\n3,4\n500,6\n")
    with pytest.raises(BadInput, match=r"007_cyt01.dat: polygon: box .* lies outside the image \(160x160\)"):
        load_classification(root)


def test_class_folders(tmp_path, build):
    root = tmp_path / "cells"
    for i, (cls, n) in enumerate((("ASC-US", 2), ("lsil", 3), ("trich", 1))):
        for k in range(n):
            build.write_image(root / cls / f"{k}.png", 32, 32, seed=i * 10 + k)
    (root / "ASC-US" / "notes.txt").write_text("not an image")
    assert detect_format(root) == "folders"
    ds = load_classification(root)  # folder names in the default taxonomy: its classes and order
    counts = dict(zip(ds.classes, ds.class_counts().tolist()))
    assert counts["ascus"] == 2 and counts["lsil"] == 3 and counts["trichomonas"] == 1
    other = tmp_path / "other"
    for cls in ("zeta", "alpha"):
        build.write_image(other / cls / "a.jpg", 20, 20)
    ds2 = load_classification(other)
    assert ds2.classes == ["alpha", "zeta"] and ds2.taxonomy is None
    assert sorted((ds2.classes[it.label], it.file.parent.name) for it in ds2.items) == [("alpha", "alpha"), ("zeta", "zeta")]


def test_classification_mapping(tmp_path, build):
    root = tmp_path / "cells"
    for cls in ("koilo", "dysk", "normal"):
        build.write_image(root / cls / "a.png", 20, 20)
    m = tmp_path / "m.json"
    m.write_text('{"classes": {"koilocyte": "LSIL", "dyskeratocyte": "HSIL"}, '
                 '"aliases": {"koilo": "koilocyte", "dysk": "dyskeratocyte"}, "ignore": ["normal"]}')
    ds = load_classification(root, mapping=m)
    assert ds.classes == ["koilocyte", "dyskeratocyte"] and len(ds) == 2
    m.write_text('{"classes": {"koilocyte": "LSIL"}}')
    with pytest.raises(BadInput, match=r"folder class 'dysk' is not in"):
        load_classification(root, mapping=m)


def test_check_sipakmed_cli(tmp_path, build, run_cli, run_json):
    root = make_sipakmed(tmp_path / "sip", build)
    res = run_json("data", "check", root)
    assert res["format"] == "sipakmed"
    rows = {r["name"]: r for r in res["sets"][0]["classes"]}
    assert rows["dyskeratotic"]["cells"] == 3 and rows["dyskeratotic"]["with_box"] == 3
    assert rows["dyskeratotic"]["max_long_side_px"] == 52.75  # 001_cyt01: 49.5 x 52.75 px
    (root / "im_Koilocytotic" / "007.bmp").write_bytes(b"BM" + b"\0" * 10)  # header too short: unreadable
    code, _, err = run_cli("data", "check", root)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "007.bmp" in err
