"""Bundles exported once per session from the shared tiny checkpoint (tests/conftest.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def export_once(cache_dir: Path, ckpt: Path, name: str, **opts) -> Path:
    """Export `ckpt` into cache_dir/name (once per cache) with few calibration tiles and validation images."""
    from cyto_edge.export.pipeline import ExportOptions, export_bundle

    out = cache_dir / name
    if not out.exists():                      # exported beside, then renamed: never a half-written bundle
        part = cache_dir / f"partial-{name}"
        kw = dict(calib_images=16, val_images=3, threads=2)
        kw.update(opts)
        export_bundle(ckpt, ExportOptions(out=part, **kw), show_progress=False)
        part.rename(out)
    return out


@pytest.fixture(scope="session")
def openvino_int8_bundle(cache_dir, tiny_checkpoint) -> Path:
    """--target openvino --precision int8: model.onnx, model.int8.onnx, openvino/model.xml, openvino/model.int8.xml."""
    return export_once(cache_dir, tiny_checkpoint, "ov_int8.cytobundle", target="openvino", precision="int8")


@pytest.fixture(scope="session")
def openvino_fp16_bundle(cache_dir, tiny_checkpoint) -> Path:
    """--target openvino --precision fp16: model.onnx, openvino/model.xml, openvino/model.fp16.xml."""
    return export_once(cache_dir, tiny_checkpoint, "ov_fp16.cytobundle", target="openvino", precision="fp16")


@pytest.fixture
def copy_bundle(tmp_path):
    def copy(src: Path, name: str = "copy.cytobundle") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return copy
