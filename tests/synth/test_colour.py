"""Classes are told apart by morphology, not by colour.

A logistic regression on colour histograms of labelled crops (160 µm windows centred on each object)
stays within 10 points of chance (balanced accuracy, 11 classes); a control with colour-coded classes
shows that the same classifier would find colour if it were there. A small CNN trained briefly on the
same crops is at least 30 points better than chance (slow: run with -m slow).
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cyto_edge.synth.crops import labelled_crops

CHANCE = 1.0 / 11


@pytest.fixture(scope="module")
def crops():
    return labelled_crops(40, seed=0)  # 440 crops, 80x80 px from 160 px windows


def hs_hist(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) BGR -> (N, 18 x 8) normalized hue-saturation histograms."""
    out = []
    for im in images:
        hsv = cv2.cvtColor(im, cv2.COLOR_BGR2HSV)
        h = cv2.calcHist([hsv], [0, 1], None, [18, 8], [0, 180, 0, 256]).ravel()
        out.append(h / h.sum())
    return np.asarray(out)


def rgb_hist(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) BGR -> (N, 8 x 8 x 8) normalized colour histograms."""
    out = []
    for im in images:
        h = cv2.calcHist([im], [0, 1, 2], None, [8, 8, 8], [0, 256] * 3).ravel()
        out.append(h / h.sum())
    return np.asarray(out)


def cv_balanced_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    pred = cross_val_predict(clf, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0))
    return float(balanced_accuracy_score(y, pred))


def test_crop_set_is_balanced_and_centred(crops):
    assert crops.images.shape == (440, 80, 80, 3) and np.bincount(crops.labels).tolist() == [40] * 11
    centres = (crops.boxes[:, :2] + crops.boxes[:, 2:]) / 2
    assert np.abs(centres - 40).max() <= 41  # inside the crop
    assert np.median(np.abs(centres - 40)) < 4  # centred except near field borders


@pytest.mark.parametrize("features", [hs_hist, rgb_hist], ids=["hue-saturation", "rgb"])
def test_colour_histograms_stay_near_chance(crops, features):
    acc = cv_balanced_accuracy(features(crops.images), crops.labels)
    print(f"colour-only balanced accuracy {acc:.3f} (chance {CHANCE:.3f})")
    assert acc <= CHANCE + 0.10, f"colour alone separates the classes: balanced accuracy {acc:.3f}"


def test_colour_coded_classes_would_be_found(crops):
    """Control: give every class its own hue shift and the same classifier separates them."""
    coded = []
    for im, c in zip(crops.images, crops.labels):
        hsv = cv2.cvtColor(im, cv2.COLOR_BGR2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + 15 * int(c)) % 180
        coded.append(cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR))
    acc = cv_balanced_accuracy(hs_hist(np.asarray(coded)), crops.labels)
    assert acc >= CHANCE + 0.35, acc


@pytest.mark.slow
def test_small_cnn_tells_the_classes_apart():
    torch = pytest.importorskip("torch")
    from sklearn.metrics import balanced_accuracy_score

    torch.set_num_threads(2)
    torch.manual_seed(0)
    train, test = labelled_crops(70, seed=1), labelled_crops(30, seed=2)
    net = _small_cnn(torch)
    _fit(torch, net, _tensor(torch, train.images), torch.from_numpy(train.labels), epochs=40)
    net.eval()
    with torch.no_grad():
        pred = net(_tensor(torch, test.images)).argmax(1).numpy()
    acc = balanced_accuracy_score(test.labels, pred)
    print(f"small CNN balanced accuracy {acc:.3f} (chance {CHANCE:.3f})")
    assert acc >= CHANCE + 0.30, f"a small CNN reached only {acc:.3f}"


def _tensor(torch, images: np.ndarray):
    t = torch.from_numpy(np.ascontiguousarray(images[..., ::-1])).permute(0, 3, 1, 2).float() / 255.0
    return (t - 0.8) / 0.2


def _small_cnn(torch):
    nn = torch.nn

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(3, 24), block(24, 48), block(48, 96), block(96, 96), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(96, 11))


def _fit(torch, net, x, y, epochs: int) -> None:
    """AdamW, batch 32, flips and 90-degree rotations (morphology does not depend on orientation)."""
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * ((len(y) + 31) // 32))
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(perm), 32):
            b = perm[i:i + 32]
            xb = torch.rot90(x[b], int(torch.randint(4, (1,), generator=g)), (2, 3))
            if torch.rand(1, generator=g) < 0.5:
                xb = xb.flip(3)
            loss = torch.nn.functional.cross_entropy(net(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
