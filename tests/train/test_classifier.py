"""The attention cell classifier: blocks, every registered variant, crops, training, the command."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from cyto_edge.cli import main
from cyto_edge.errors import BadInput
from cyto_edge.train import cellcrops
from cyto_edge.train.cellcrops import CropSet, CropSpec, cut_crop, to_rgb
from cyto_edge.train.classify import (ClassifierSettings, load_checkpoint, report, splits, stratified_folds,
                                      train_classifier)
from cyto_edge.train.models.classifier import ARCHS, DNL, SAM, SE, create_classifier, param_count

torch.set_num_threads(1)
TINY = {"resnet50": {"width": 4}, "resnet18": {"width": 4}, "small": {"width": 4}}


def blobs(n: int, size: int = 32, seed: int = 0) -> CropSet:
    """A separable 3-class set: a pale cell with a nucleus of radius 2, 4 or 7 px, random position, noise."""
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for i in range(n):
        c = i % 3
        im = np.full((size, size, 3), 230, np.uint8)
        cx, cy = (int(v) for v in rng.uniform(size * 0.35, size * 0.65, 2))
        cv2.circle(im, (cx, cy), size // 3, (120, 180, 200), -1)
        cv2.circle(im, (cx, cy), (2, 4, 7)[c], (60, 40, 120), -1)
        imgs.append(np.clip(im + rng.normal(0, 8, im.shape), 0, 255).astype(np.uint8))
        labels.append(c)
    return CropSet(np.stack(imgs), np.array(labels), ["small", "medium", "large"], source="blobs")


def test_blocks_keep_shape_and_scale_as_specified():
    x = torch.randn(2, 16, 6, 5)
    se, sam, dnl = SE(16), SAM(), DNL(16)
    for block in (se, sam, dnl):
        assert block(x).shape == x.shape
    s = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean((2, 3))))))      # eq. 1-3: one factor per channel
    assert torch.allclose(se(x), x * s[:, :, None, None])
    g = torch.sigmoid(sam.conv(x.mean(1, keepdim=True)))               # eq. 4-6: one factor per position
    assert torch.allclose(sam(x), x * g)
    assert torch.allclose(dnl(x), x)                                   # zero-initialised output BN: identity
    torch.nn.init.ones_(dnl.out[1].weight)
    dnl.eval()
    assert not torch.allclose(dnl(x), x)


def test_dnl_pairwise_term_is_whitened():
    """Adding a constant to the query and key embeddings (a shared bias) must not change the output."""
    torch.manual_seed(0)
    d = DNL(8).eval()
    torch.nn.init.ones_(d.out[1].weight)
    x = torch.randn(1, 8, 4, 4)
    y0 = d(x)
    with torch.no_grad():
        d.query.bias += 3.0
        d.key.bias -= 2.0
    assert torch.allclose(d(x), y0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS.names())
@pytest.mark.parametrize("flags", [dict(se=False, sam=False, dnl=False), dict(se=True, sam=False, dnl=False),
                                   dict(se=False, sam=True, dnl=False), dict(se=False, sam=False, dnl=True),
                                   dict(se=True, sam=True, dnl=False), dict(se=True, sam=True, dnl=True)])
def test_every_variant_forward_backward(arch, flags):
    torch.manual_seed(0)
    m = create_classifier(arch, num_classes=5, **flags, **TINY[arch])
    x = torch.randn(2, 3, 48, 48)
    y = m(x)
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    y.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)
    assert m.embed(x).shape == (2, sum(m.stage_channels[1:]))          # GAP of stages 3-5, concatenated


@pytest.mark.parametrize("arch", ARCHS.names())
def test_switching_blocks_off_changes_the_parameter_count(arch):
    full = param_count(create_classifier(arch, num_classes=3, **TINY[arch]))
    for flag in ("se", "sam", "dnl"):
        assert param_count(create_classifier(arch, num_classes=3, **{flag: False}, **TINY[arch])) < full
    m = create_classifier(arch, num_classes=3, **TINY[arch])
    n_blocks = [len(s) for s in m.stages]
    assert sum(isinstance(b, SE) for b in m.modules()) == sum(n_blocks[:3])   # stages 2-4 only
    assert sum(isinstance(b, SAM) for b in m.modules()) == sum(n_blocks[:3])
    assert sum(isinstance(b, DNL) for b in m.modules()) == 1


def test_unknown_architecture_names_the_choices():
    with pytest.raises(BadInput, match="resnet50"):
        create_classifier("vgg", num_classes=3)


def test_images_of_any_channel_layout_become_rgb():
    gray = np.full((5, 7), 100, np.uint8)
    assert to_rgb(gray, "g").shape == (5, 7, 3)
    bgra = np.zeros((5, 7, 4), np.uint8)
    bgra[..., 0] = 255                                                   # blue in BGR(A)
    assert to_rgb(bgra, "a")[0, 0].tolist() == [0, 0, 255]
    assert to_rgb(np.full((3, 3), 65535, np.uint16), "w").max() == 255
    with pytest.raises(BadInput, match="5 channels"):
        to_rgb(np.zeros((4, 4, 5), np.uint8), "five.tif")
    with pytest.raises(BadInput, match="cannot decode"):
        to_rgb(None, "broken.png")


def test_crop_geometry_square_context_and_border():
    img = np.zeros((100, 200, 3), np.uint8)
    img[40:60, 90:110] = 255                                             # a 20 px white square
    c = cut_crop(img, (90, 40, 110, 60), 40, CropSpec(context=0.5))      # window 40 px: 10 px margin
    assert c.shape == (40, 40, 3)
    assert c[10:30, 10:30].min() == 255 and c[:8].max() == 0
    edge = cut_crop(img, (0, 0, 10, 10), 16, CropSpec(context=0.5))      # half outside: replicated border
    assert edge.shape == (16, 16, 3)
    fixed = cut_crop(img, (95, 45, 105, 55), 30, CropSpec(fixed_side=30))
    assert fixed[5:25, 5:25].min() == 255


def test_class_folders_of_mixed_sizes_and_channels(tmp_path):
    from cyto_edge.train.data.load import load_classification

    rng = np.random.default_rng(0)
    for k, cls in enumerate(("alpha", "beta")):
        (tmp_path / cls).mkdir()
        cv2.imwrite(str(tmp_path / cls / "a.png"), rng.integers(0, 255, (37, 51), dtype=np.uint8))      # gray
        cv2.imwrite(str(tmp_path / cls / "b.png"), rng.integers(0, 255, (90, 60, 4), dtype=np.uint8))   # RGBA
        cv2.imwrite(str(tmp_path / cls / "c.bmp"), rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    crops = cellcrops.from_classification(load_classification(tmp_path), 24)
    assert crops.images.shape == (6, 24, 24, 3) and crops.images.dtype == np.uint8
    assert crops.counts().tolist() == [3, 3] and crops.spec is None


def test_stratified_folds_and_report():
    y = np.array([0] * 10 + [1] * 5 + [2] * 20)
    f = stratified_folds(y, 5, seed=1)
    for k in range(5):
        assert np.bincount(y[f == k], minlength=3).tolist() == [2, 1, 4]
    tr, te = splits(y, 1, 0.2, 0)[0]
    assert len(set(tr) & set(te)) == 0 and len(tr) + len(te) == len(y)
    with pytest.raises(BadInput, match="fewer than --folds"):
        splits(np.array([0, 0, 0, 1]), 2, 0.2, 0)
    r = report(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["a", "b"])
    assert r["accuracy"] == 0.75 and r["confusion"] == [[1, 1], [0, 2]]
    assert r["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}


def test_short_training_learns_a_separable_set(tmp_path):
    crops = blobs(240)
    s = ClassifierSettings(arch="small", width=8, img_size=32, epochs=10, batch=32, lr=5e-3, val_fraction=0.25)
    summary = train_classifier(crops, s, tmp_path, progress=False)
    assert summary["accuracy_mean"] >= 0.8                               # chance: 0.33
    model, meta = load_checkpoint(tmp_path / "classifier.pt")
    assert meta["classes"] == crops.classes and meta["input"]["size"] == [32, 32]
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    assert json.loads((tmp_path / "metrics.json").read_text())["pooled"]["n"] == 60


def _write_folders(root, n=24, size=32):
    crops = blobs(n, size)
    for i, (im, lab) in enumerate(zip(crops.images, crops.labels)):
        d = root / crops.classes[lab]
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"{i}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    return root


def test_command_cross_validation_writes_every_fold(tmp_path, capsys):
    data = _write_folders(tmp_path / "crops")
    rc = main(["train-classifier", "--data", str(data), "--arch", "small", "--width", "4", "--img-size", "24",
               "--epochs", "1", "--batch", "8", "--folds", "2", "--out", str(tmp_path / "out"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["folds"] == 2 and len(out["fold_accuracy"]) == 2
    for f in ("fold1.pt", "fold2.pt", "confusion.png", "confusion_fold1.png", "metrics.json"):
        assert (tmp_path / "out" / f).is_file()


def test_command_refuses_bad_usage_in_one_line(tmp_path, capsys):
    assert main(["train-classifier", "--out", str(tmp_path)]) == 2
    assert "exactly one of --data" in capsys.readouterr().err
    assert main(["train-classifier", "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
    data = _write_folders(tmp_path / "crops", n=9)
    assert main(["train-classifier", "--data", str(data), "--folds", "5"]) == 2
    assert "fewer than --folds 5" in capsys.readouterr().err


def test_command_refuses_classes_that_are_not_the_bundles(tmp_path, capsys):
    from cyto_edge.runtime.bundle import InputSpec, Manifest, OutputSpec, file_entry, write_manifest

    bundle = tmp_path / "det.cytobundle"
    bundle.mkdir()
    np.save(bundle / "priors.npy", np.zeros((4, 4), np.float32))
    write_manifest(bundle, Manifest(classes=["lsil", "hsil"], bethesda={"lsil": "LSIL", "hsil": "HSIL"},
                                    um_per_px=1.0, input=InputSpec(size=(64, 64)), output=OutputSpec(num_priors=4),
                                    files=[file_entry(bundle, "priors.npy", "priors", role="priors")]))
    data = _write_folders(tmp_path / "crops", n=9)                       # classes small, medium, large
    rc = main(["train-classifier", "--data", str(data), "--bundle", str(bundle), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "are not classes of the bundle (lsil, hsil)" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
