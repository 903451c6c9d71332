"""INT8: calibration tiles as the device cuts them, one symmetric QDQ file per calibration method."""
from __future__ import annotations

import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.export.calibration import TileReader, calibration_tiles, image_tiles, read_rgb, scale_factor
from cyto_edge.export.quantize import METHODS, export_int8, qdq_coverage, zero_points_nonzero
from cyto_edge.export.trt_lint import lint_onnx
from cyto_edge.runtime.bundle import Bundle


@pytest.fixture(scope="module")
def train_ds(synth_small):
    from cyto_edge.train.data import load_detection

    return load_detection(synth_small, "train")


@pytest.fixture(scope="module")
def tiles(train_ds, tiny_bundle):
    return calibration_tiles(train_ds, Bundle.open(tiny_bundle).manifest, 8, seed=0)


def test_calibration_tiles_are_what_the_device_sees(train_ds, tiny_bundle):
    m = Bundle.open(tiny_bundle).manifest
    one = train_ds.subset([0])
    t = calibration_tiles(one, m, 3, seed=5)
    assert t.shape == (3, 3, *m.input.size) and t.dtype == np.float32
    device = image_tiles(read_rgb(one.images[0].file), m, scale_factor(one.um_per_px, m))   # runtime/tiling's cut
    for tile in t:
        assert np.min(np.abs(device - tile).reshape(len(device), -1).max(1)) == 0.0
    again = calibration_tiles(one, m, 3, seed=5)
    np.testing.assert_array_equal(t, again)                          # seeded
    with pytest.raises(BadInput, match="--calib-images"):
        calibration_tiles(one, m, 0)


def test_tile_reader_batches_and_rewinds(tiles):
    r = TileReader(tiles, "images", batch=3)
    sizes = []
    while (b := r.get_next()) is not None:
        sizes.append(len(b["images"]))
    assert sizes == [3, 3, 2] and len(r) == 3
    r.rewind()
    assert r.get_next()["images"].shape[0] == 3


@pytest.mark.parametrize("method", METHODS)
def test_int8_qdq_per_method(tiny_bundle, tiles, tmp_path, method):
    import onnxruntime as ort

    out = export_int8(tiny_bundle / "model.onnx", tmp_path / f"{method}.onnx", tiles, method)
    cov = qdq_coverage(out)
    assert cov["fraction"] >= 0.95 and cov["inputs_quantized_fraction"] >= 0.95, cov
    assert zero_points_nonzero(out) == [] and lint_onnx(out) == []   # symmetric: TensorRT takes it
    x = tiles[:4]
    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})

    ref, q = run(tiny_bundle / "model.onnx"), run(out)
    for a, r in zip(q, ref):
        assert np.corrcoef(a.ravel(), r.ravel())[0, 1] > 0.98
        assert not np.array_equal(a, r)                              # it really is quantized


def test_unknown_method_is_bad_input(tiny_bundle, tiles, tmp_path):
    with pytest.raises(BadInput, match="--calib-method"):
        export_int8(tiny_bundle / "model.onnx", tmp_path / "x.onnx", tiles, "kl")
