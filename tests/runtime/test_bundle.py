"""The runtime refuses a bundle it cannot trust, naming the problem; `bundle info|verify`; .zip/.tar bundles."""
from __future__ import annotations

import json
import shutil
import tarfile
import zipfile

import pytest

from cyto_edge.cli import main
from cyto_edge.runtime.bundle import Bundle, BundleError


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("CYTO_EDGE_CACHE", str(tmp_path / "cache"))   # archives unpack here
    dst = tmp_path / "b.cytobundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_good_bundle_opens_and_verifies(bundle_copy, capsys):
    b = Bundle.open(bundle_copy)
    assert b.priors().shape == (b.manifest.output.num_priors, 4)
    assert main(["bundle", "verify", str(bundle_copy)]) == 0
    assert "ok" in capsys.readouterr().out


def test_tampered_file_is_refused(bundle_copy, capsys):
    data = bytearray((bundle_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF                     # same size, one byte flipped
    (bundle_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx does not match its sha256"):
        Bundle.open(bundle_copy)
    assert main(["bundle", "verify", str(bundle_copy)]) == 1
    assert "model.onnx does not match its sha256" in capsys.readouterr().err


def test_missing_file_is_refused(bundle_copy, capsys):
    (bundle_copy / "priors.npy").unlink()
    with pytest.raises(BundleError, match=r"missing file priors\.npy"):
        Bundle.open(bundle_copy)
    assert main(["bundle", "verify", str(bundle_copy)]) == 1
    assert "missing file priors.npy" in capsys.readouterr().err


def test_unknown_schema_version_is_refused(bundle_copy, capsys):
    _edit_manifest(bundle_copy, lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        Bundle.open(bundle_copy)
    assert main(["bundle", "verify", str(bundle_copy)]) == 1
    assert "schema_version 99" in capsys.readouterr().err


@pytest.mark.parametrize("edit,field", [
    (lambda m: m.update(um_per_px=-1), "um_per_px"),
    (lambda m: m["input"].update(layout="NHWC"), "input.layout"),
    (lambda m: m.update(unexpected_field=1), "unexpected_field"),
])
def test_invalid_manifest_field_is_refused(bundle_copy, capsys, edit, field):
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=field.replace(".", r"\.")):
        Bundle.open(bundle_copy)
    assert main(["bundle", "verify", str(bundle_copy)]) == 1
    assert field in capsys.readouterr().err


def test_unreadable_manifest_and_missing_bundle(bundle_copy, tmp_path, capsys):
    (bundle_copy / "manifest.json").write_text("{not json")
    assert main(["bundle", "verify", str(bundle_copy)]) == 1
    assert "unreadable manifest" in capsys.readouterr().err
    assert main(["bundle", "verify", str(tmp_path / "nothing.cytobundle")]) == 2


def test_zip_and_tar_bundles_open(bundle_copy, tmp_path):
    z = tmp_path / "b.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in bundle_copy.rglob("*"):
            zf.write(p, p.relative_to(bundle_copy.parent))
    t = tmp_path / "b.tar.gz"
    with tarfile.open(t, "w:gz") as tf:
        tf.add(bundle_copy, arcname=bundle_copy.name)
    for archive in (z, t):
        b = Bundle.open(archive)
        assert b.manifest.file("onnx", "fp32") is not None and (b.path / "model.onnx").is_file()
        assert main(["bundle", "verify", str(archive)]) == 0


def test_archive_with_tampered_member_is_refused(bundle_copy, tmp_path):
    (bundle_copy / "model.onnx").write_bytes((bundle_copy / "model.onnx").read_bytes() + b"\0")
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in bundle_copy.rglob("*"):
            zf.write(p, p.relative_to(bundle_copy.parent))
    with pytest.raises(BundleError, match="does not match its sha256"):
        Bundle.open(z)


def test_bundle_info_json(bundle_copy, capsys):
    assert main(["bundle", "info", str(bundle_copy), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    m = json.loads((bundle_copy / "manifest.json").read_text())
    assert s["verified"] is True and list(s["classes"]) == m["classes"]
    assert s["input"]["size"] == m["input"]["size"] and s["output"]["names"][:2] == ["loc", "logits"]
    assert {f["path"]: f["size"] for f in s["files"]} == {f["path"]: f["size"] for f in m["files"]}
    (bundle_copy / "model.onnx").write_bytes(b"x")
    assert main(["bundle", "info", str(bundle_copy), "--json"]) == 0   # info still shows a broken bundle
    assert json.loads(capsys.readouterr().out)["verified"] is False
