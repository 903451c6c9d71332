"""Integrated gradients: exactness on a linear model, completeness on a network, overlays, the command,
the batch mode and the HTTP service (a real server on a free loopback port)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
import torch

from cyto_edge.cli import main
from cyto_edge.errors import BadInput
from cyto_edge.explain_service import request_explanation, result_paths
from cyto_edge.train.explain import (attribution_map, integrated_gradients, make_baseline, overlay, path_points)
from cyto_edge.train.models.rcan import build_classifier, save_checkpoint

SMALL = dict(widths=(8, 16, 32), groups=1, blocks=1, reduction=4)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image(h=48, w=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 220, np.uint8)
    for _ in range(4):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(5, 12)), tuple(int(v) for v in rng.integers(40, 200, 3)), -1)
    return img


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = build_classifier("rcan", 3, **SMALL)
    with torch.no_grad():   # a head that actually separates the classes: scores move between x and x'
        m.head[-1].weight.mul_(20)
    p = tmp_path_factory.mktemp("ckpt") / "rcan.pt"
    return save_checkpoint(p, m.eval(), arch="rcan", arch_kwargs=SMALL, classes=["nilm", "lsil", "hsil"],
                           mean=(0.5,) * 3, std=(0.25,) * 3, input_size=(48, 64))


@pytest.mark.parametrize("method", ["riemann", "trapezoid", "midpoint"])
def test_linear_model_attributions_are_input_times_weight(method):
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.normal(size=(3, 6, 7)).astype(np.float32))
    x = rng.uniform(size=(3, 6, 7)).astype(np.float32)
    base = rng.uniform(size=(3, 6, 7)).astype(np.float32)
    fn = lambda b: (b * w).sum((1, 2, 3)) + 0.3  # noqa: E731
    r0 = integrated_gradients(fn, x, np.zeros_like(x), steps=3, method=method)
    np.testing.assert_allclose(r0.attributions, x * w.numpy(), rtol=1e-5, atol=1e-6)
    r1 = integrated_gradients(fn, x, base, steps=2, method=method)
    np.testing.assert_allclose(r1.attributions, (x - base) * w.numpy(), rtol=1e-5, atol=1e-6)
    assert r1.relative_error < 1e-5


def test_path_points_weights_sum_to_one():
    for m in ("riemann", "trapezoid", "midpoint"):
        a, w = path_points(10, m)
        assert abs(w.sum() - 1) < 1e-12 and a.min() >= 0 and a.max() <= 1
    with pytest.raises(BadInput):
        path_points(10, "simpson")


def test_completeness_on_a_small_network():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Softplus(), torch.nn.Conv2d(8, 4, 3),
                              torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2)).eval()
    with torch.no_grad():
        net[-1].weight.mul_(10)
    fn = lambda b: torch.softmax(net(b * 6 - 3), 1)[:, 1]  # noqa: E731
    x = np.random.default_rng(1).uniform(size=(3, 16, 16)).astype(np.float32)
    coarse = integrated_gradients(fn, x, np.zeros_like(x), steps=2, method="riemann")
    fine = integrated_gradients(fn, x, np.zeros_like(x), steps=300, method="trapezoid")
    assert abs(fine.delta) > 0.02                    # the score really changes along the path
    assert fine.relative_error < 0.001 < 0.1 < coarse.relative_error
    assert fine.relative_error < coarse.relative_error
    c = fine.completeness()
    assert c["sum_attributions"] == pytest.approx(fine.attributions.sum(), rel=1e-5)
    assert c["score_difference"] == pytest.approx(c["score"] - c["baseline_score"])


def test_baselines():
    x = np.random.default_rng(0).uniform(size=(3, 32, 40)).astype(np.float32)
    assert not make_baseline(x, "black").any()
    blur = make_baseline(x, "blur")
    assert blur.shape == x.shape and blur.std() < x.std() / 3
    n1, n2 = make_baseline(x, "noise", seed=3), make_baseline(x, "noise", seed=3)
    assert np.array_equal(n1, n2) and 0 <= n1.min() and n1.max() <= 1
    with pytest.raises(BadInput, match="black, blur, noise"):
        make_baseline(x, "gray")


def test_overlay_follows_heat():
    rgb = np.full((20, 30, 3), 128, np.uint8)
    attr = np.zeros((3, 20, 30), np.float32)
    attr[:, 5:10, 5:10] = 1.0
    heat = attribution_map(attr)
    out = overlay(rgb, heat)
    assert out.shape == rgb.shape
    assert np.array_equal(out[15:, 15:], rgb[15:, 15:])       # no attribution: the image unchanged
    assert not np.array_equal(out[5:10, 5:10], rgb[5:10, 5:10])


def test_explain_command_writes_overlay_of_image_size(ckpt, tmp_path, capsys):
    img = tmp_path / "crop.png"
    cv2.imwrite(str(img), _image(48, 64))
    out = tmp_path / "o" / "overlay.png"
    assert main(["explain", str(ckpt), str(img), "--out", str(out), "--steps", "16", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    png = cv2.imread(str(out))
    assert png is not None and png.shape == (48, 64, 3)
    c = res["completeness"]
    assert abs(c["sum_attributions"] - c["score_difference"]) == pytest.approx(c["abs_error"], abs=1e-9)
    assert res["class"] in ("nilm", "lsil", "hsil") and c["steps"] == 16
    assert json.loads((tmp_path / "o" / "overlay.json").read_text())["completeness"] == c
    # a gate that cannot pass exits 1; a wrong class name exits 2 naming the choices
    assert main(["explain", str(ckpt), str(img), "--out", str(out), "--steps", "2", "--max-rel-error", "0"]) == 1
    assert main(["explain", str(ckpt), str(img), "--class", "ascus", "--out", str(out)]) == 2
    assert "nilm, lsil, hsil" in capsys.readouterr().err


def test_batch_mode_writes_beside_crops_and_counts_failures(ckpt, tmp_path, capsys):
    crops = tmp_path / "store" / "session-1"
    crops.mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(str(crops / f"cell-{i}.jpg"), _image(40, 40, seed=i))
    (crops / "broken.png").write_bytes(b"not an image")
    assert main(["explain", str(ckpt), "--batch", str(tmp_path / "store"), "--steps", "4", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["crops"] == 3 and s["explained"] == 2 and len(s["failed"]) == 1 and "broken.png" in s["failed"][0]["crop"]
    png, info = result_paths(crops / "cell-0.jpg")
    assert png.name == "cell-0.jpg.explain.png" and cv2.imread(str(png)).shape == (40, 40, 3)
    assert json.loads(info.read_text())["crop"].endswith("cell-0.jpg")
    assert main(["explain", str(ckpt), "--batch", str(tmp_path / "store"), "--steps", "4", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["crops"] == 3 and s["up_to_date"] == 2 and s["explained"] == 0   # results are not crops


@pytest.fixture
def server(ckpt):
    from cyto_edge.train.explain_server import make_server
    from cyto_edge.train.explain_targets import Explainer

    srv = make_server(Explainer(ckpt), "127.0.0.1", 0, token="s3cret")
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_http_service_round_trip(server, tmp_path):
    ok, buf = cv2.imencode(".jpg", _image(36, 52))
    png, info = request_explanation(server, buf.tobytes(), steps=8, baseline="blur", token="s3cret")
    ov = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert ov.shape == (36, 52, 3) and info["completeness"]["baseline"] == "blur"
    assert info["image_size"] == [52, 36]
    with pytest.raises(BadInput, match="401"):
        request_explanation(server, buf.tobytes(), steps=2, token="wrong")
    with pytest.raises(BadInput, match="cannot decode"):
        request_explanation(server, b"garbage", steps=2, token="s3cret")
    with pytest.raises(BadInput, match="steps must be"):
        request_explanation(server, buf.tobytes(), steps=10_000, token="s3cret")
    # the device's path: a process where torch cannot be imported sends a folder of crops; results beside them
    d = tmp_path / "crops"
    d.mkdir()
    cv2.imwrite(str(d / "a.png"), _image(30, 30))
    code = ("import sys; sys.modules['torch'] = None; from cyto_edge.cli import main; "
            f"sys.exit(main(['explain', '--remote', {server!r}, '--batch', {str(d)!r}, '--token', 's3cret', "
            "'--steps', '4', '--json']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["explained"] == 1
    assert cv2.imread(str(d / "a.png.explain.png")).shape == (30, 30, 3)
    assert json.loads((d / "a.png.explain.json").read_text())["completeness"]["steps"] == 4


def test_service_refuses_open_bind_without_token(ckpt):
    from cyto_edge.train.explain_server import make_server
    from cyto_edge.train.explain_targets import Explainer

    with pytest.raises(BadInput, match="--token"):
        make_server(Explainer(ckpt), "0.0.0.0", 0, token=None)


def test_detection_score_explained_for_box(tmp_path, capsys):
    det_mod = pytest.importorskip("cyto_edge.train.models.detector")
    torch.manual_seed(0)
    d = det_mod.create_model("tiny", num_classes=2, input_size=128, width=8)
    ck = tmp_path / "det.pt"
    torch.save({"format": "cyto-edge-ckpt/1", "model": det_mod.spec_dict(d), "state_dict": d.state_dict(),
                "classes": ["lsil", "hsil"], "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}, ck)
    img = tmp_path / "field.png"
    cv2.imwrite(str(img), _image(150, 200))          # larger than the input: a window around the box
    out = tmp_path / "det_overlay.png"
    assert main(["explain", str(ck), str(img), "--box", "120,60,170,110", "--steps", "4", "--out", str(out),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kind"] == "detector" and res["match_iou"] > 0
    x0, y0, x1, y1 = res["window_xyxy"]
    assert x0 <= 120 and x1 >= 170 and y0 <= 60 and y1 >= 110 and x1 - x0 == 128
    assert cv2.imread(str(out)).shape == (150, 200, 3)


def test_attention_cell_classifier_checkpoint_with_resize(tmp_path, capsys):
    """The cell classifier takes S x S resized crops: the resize is inside the explained function, so the
    attributions (and the overlay) are at the crop's own size and completeness still holds."""
    clf_mod = pytest.importorskip("cyto_edge.train.models.classifier")
    torch.manual_seed(0)
    m = clf_mod.create_classifier("small", num_classes=2, width=8).eval()
    ck = tmp_path / "cell.pt"
    torch.save({"format": "cyto-edge/cell-classifier", "version": 1, "arch": "small", "arch_kw": {"width": 8},
                "state_dict": m.state_dict(), "classes": ["nilm", "hsil"],
                "input": {"size": [32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}, ck)
    img = tmp_path / "cell.png"
    cv2.imwrite(str(img), _image(40, 50))
    out = tmp_path / "cell_overlay.png"
    assert main(["explain", str(ck), str(img), "--class", "hsil", "--steps", "64", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["class"] == "hsil" and cv2.imread(str(out)).shape == (40, 50, 3)
    assert res["completeness"]["relative_error"] < 0.05 or res["completeness"]["abs_error"] < 1e-4
