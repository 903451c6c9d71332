"""The learned FOV grader: eq. 1-9, masks and variable cell counts, the CLAM sample selection, training."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch

from cyto_edge.cli import main
from cyto_edge.errors import BadInput
from cyto_edge.train.cellcrops import CropSpec
from cyto_edge.train.grade_train import FovSet, GraderSettings, fov_report, parse_grade, train_grader
from cyto_edge.train.models.grader import (BLSTM, FOVGrader, GraderConfig, _lstm_direction, cell_loss,
                                           grader_loss, num_samples, select_cells)

torch.set_num_threads(1)


def tiny_cfg(**kw) -> GraderConfig:
    base = dict(num_classes=3, crop=24, backbone_kw={"width": 4, "dnl": False}, hidden=8, vit_dim=16,
                vit_layers=1, vit_heads=2)
    return GraderConfig(**{**base, **kw})


@pytest.mark.parametrize("local,peephole", [(True, True), (False, True), (True, False)])
def test_variants_forward_backward(local, peephole):
    torch.manual_seed(0)
    m = FOVGrader(tiny_cfg(local=local, peephole=peephole))
    cells = torch.randn(3, 7, 3, 24, 24)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0], mask[1, :3] = True, True                                    # 7, 3 and 0 cells
    out = m(cells, mask)
    loss, parts = grader_loss(out, mask, torch.tensor([2, 1, 0]), lam=0.25 if local else 0.0)
    loss.backward()
    assert torch.isfinite(loss) and (parts["cell"] > 0) == local
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert ("cell_logits" in out) == local


def test_zero_one_and_many_cells_never_nan_and_empty_is_low_confidence_nilm():
    torch.manual_seed(0)
    m = FOVGrader(tiny_cfg()).eval()
    with torch.no_grad():
        empty = m(torch.zeros(1, 0, 3, 24, 24), torch.zeros(1, 0, dtype=torch.bool))
        masked = m(torch.randn(1, 4, 3, 24, 24), torch.zeros(1, 4, dtype=torch.bool))
        one = m(torch.randn(1, 1, 3, 24, 24), torch.ones(1, 1, dtype=torch.bool))
        many = m(torch.randn(1, 60, 3, 24, 24), torch.ones(1, 60, dtype=torch.bool))
    for out in (empty, masked):
        assert out["probs"].argmax().item() == 0
        assert out["probs"][0, 0].item() == pytest.approx(2 / 4) and out["probs"].max() < 0.6
        assert out["cell_scores"].abs().sum() == 0
    for out in (one, many):
        assert torch.isfinite(out["probs"]).all() and out["probs"].sum().item() == pytest.approx(1, abs=1e-6)
        assert out["cell_scores"].sum().item() == pytest.approx(1, abs=1e-5)  # eq. 9 is a softmax over cells
    assert one["cell_scores"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("train_mode", [False, True])
def test_padding_is_irrelevant(train_mode):
    torch.manual_seed(0)
    m = FOVGrader(tiny_cfg())
    m.train(train_mode)
    real = torch.randn(2, 5, 3, 24, 24)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    padded = torch.cat([real, 50 * torch.randn(2, 6, 3, 24, 24)], 1)     # garbage in 6 more slots
    pmask = torch.cat([mask, torch.zeros(2, 6, dtype=torch.bool)], 1)
    padded[1, 2:5] = 50 * torch.randn(3, 3, 24, 24)                     # and in FOV 1's masked slots
    with torch.no_grad():
        a, b = m(real, mask), m(padded, pmask)
    assert torch.allclose(a["logits"], b["logits"], atol=1e-5)
    assert torch.allclose(a["cell_scores"], b["cell_scores"][:, :5], atol=1e-6)
    assert b["cell_scores"][:, 5:].abs().max() == 0


def test_lstm_without_peepholes_is_torch_lstm():
    """Eq. 1 with W_c* = 0 is the standard LSTM: compare with nn.LSTM (gate order i,f,g,o vs ONNX i,o,f,c)."""
    torch.manual_seed(0)
    ours = BLSTM(5, 4, peephole=False)
    ref = torch.nn.LSTM(5, 4, batch_first=True, bidirectional=True)
    order = lambda w: torch.cat([w[0:4], w[8:12], w[12:16], w[4:8]])     # i,o,f,c -> i,f,c,o
    with torch.no_grad():
        for d, sfx in ((0, ""), (1, "_reverse")):
            getattr(ref, "weight_ih_l0" + sfx).copy_(order(ours.W[d]))
            getattr(ref, "weight_hh_l0" + sfx).copy_(order(ours.R[d]))
            getattr(ref, "bias_ih_l0" + sfx).copy_(order(ours.B[d, :16]))
            getattr(ref, "bias_hh_l0" + sfx).copy_(order(ours.B[d, 16:]))
        x = torch.randn(2, 6, 5)
        assert torch.allclose(ours(x, torch.tensor([6, 6])), ref(x)[0], atol=1e-5)


def test_peepholes_enter_as_eq_1_says():
    """One step by hand: i, f see c_{t-1} (= 0 at t = 1), o sees c_t."""
    torch.manual_seed(0)
    H, I = 3, 2
    W, R = torch.randn(4 * H, I), torch.randn(4 * H, H)
    B, P = torch.randn(8 * H), torch.randn(3 * H)
    x = torch.randn(1, 1, I)
    g = W @ x[0, 0] + B[:4 * H] + B[4 * H:]
    i, o, f, c = g.split(H)
    c1 = torch.sigmoid(i) * torch.tanh(c)                                # f * c_0 = 0
    h1 = torch.sigmoid(o + P[H:2 * H] * c1) * torch.tanh(c1)
    y = _lstm_direction(x, torch.tensor([1]), W, R, B, P, reverse=False)
    assert torch.allclose(y[0, 0], h1, atol=1e-6)


def test_backward_direction_starts_at_the_last_real_cell():
    torch.manual_seed(0)
    lstm = BLSTM(4, 3)
    x = torch.randn(1, 5, 4)
    with torch.no_grad():
        short = lstm(x[:, :3], torch.tensor([3]))
        padded = lstm(torch.cat([x[:, :3], 9 * torch.randn(1, 2, 4)], 1), torch.tensor([3]))
    assert torch.allclose(short, padded[:, :3], atol=1e-6)


@pytest.mark.parametrize("n,expected", [(0, 0), (1, 0), (2, 1), (5, 1), (14, 1), (15, 2), (24, 2), (25, 3),
                                        (100, 10), (101, 10)])
def test_number_of_samples_is_ten_percent(n, expected):
    assert num_samples(n) == expected


def test_sample_selection_rule():
    scores = torch.tensor([0.01 * i for i in range(30)])[torch.randperm(30, generator=torch.Generator().manual_seed(0))]
    top = set(torch.argsort(scores, descending=True)[:3].tolist())
    bottom = set(torch.argsort(scores)[:3].tolist())
    nilm = select_cells(scores, 0)
    assert len(nilm) == 1 and nilm[0][1].tolist() == list(range(30))    # NILM: every cell positive
    lsil = {(k, t): set(i.tolist()) for k, i, t in select_cells(scores, 1)}
    assert lsil == {(1, 1): top, (1, 0): bottom, (0, 0): top}
    hsil = {(k, t): set(i.tolist()) for k, i, t in select_cells(scores, 2)}
    assert hsil == {(2, 1): top, (2, 0): bottom, (1, 0): top, (0, 0): top}
    assert select_cells(torch.tensor([0.7]), 2) == []                    # one cell: no positive/negative pair


def test_cell_loss_trains_only_the_selected_cells():
    C, n = 3, 20
    logits = torch.zeros(1, n, C, 2, requires_grad=True)
    scores = torch.linspace(0, 1, n)[None]
    out = {"cell_logits": logits, "cell_scores": scores}
    loss = cell_loss(out, torch.ones(1, n, dtype=torch.bool), torch.tensor([2]))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2) * 3 / C)            # three branches get samples
    touched = logits.grad.abs().sum((2, 3))[0].nonzero().squeeze(1).tolist()
    assert touched == [0, 1, 18, 19]                                     # N = 2 bottom and top cells


def test_fov_report_sensitivity_specificity():
    classes = ["NILM", "ASC-US", "LSIL", "HSIL"]
    r = fov_report(np.array([0, 0, 1, 2, 3, 3]), np.array([0, 2, 0, 2, 3, 1]), classes)
    assert r["sensitivity"] == pytest.approx(2 / 3, abs=1e-4)                     # >= LSIL: 3 true, 2 found
    assert r["specificity"] == pytest.approx(2 / 3, abs=1e-4)                     # NILM, NILM, ASC-US: one called LSIL
    assert parse_grade("asc_us", "x") == "ASC-US" and parse_grade(" hsil", "x") == "HSIL"
    with pytest.raises(BadInput, match="not a Bethesda category"):
        parse_grade("CIN2", "grades.csv: line 3: grade")


def separable_fovs(n_fov: int, seed: int = 0, S: int = 24) -> FovSet:
    """Class 0: pale cells only; class 1: one cell with a large dark nucleus among 3-8 pale ones."""
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for i in range(n_fov):
        k, y = int(rng.integers(3, 9)), i % 2
        fov = np.full((k, S, S, 3), 225, np.uint8)
        for j in range(k):
            cv2.circle(fov[j], (S // 2, S // 2), 2, (90, 70, 140), -1)
        if y:
            cv2.circle(fov[int(rng.integers(k))], (S // 2, S // 2), 7, (40, 20, 90), -1)
        crops.append(np.clip(fov + rng.normal(0, 6, fov.shape), 0, 255).astype(np.uint8))
        labels.append(y)
    return FovSet(crops, np.array(labels), ["NILM", "HSIL"], [str(i) for i in range(n_fov)],
                  {"source": "test"}, CropSpec())


def test_short_training_learns_from_fov_labels_only(tmp_path):
    fs = separable_fovs(64)
    s = GraderSettings(crop=24, width=4, hidden=8, vit_dim=16, vit_layers=1, vit_heads=2, epochs=8, batch=8,
                       lr=5e-3, val_fraction=0.25)
    summary = train_grader(fs, s, tmp_path, progress=False, test=separable_fovs(40, seed=1))
    assert summary["test"]["accuracy"] >= 0.8                            # chance: 0.5
    assert (tmp_path / "grader.pt").is_file() and (tmp_path / "confusion.png").is_file()


def _coco(root, n=6, size=96):
    """Tiny COCO set: drawn cells; odd images hold one large dark nucleus and are graded HSIL."""
    (root / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        img = np.full((size, size, 3), 235, np.uint8)
        for _ in range(4):
            x, y = (int(v) for v in rng.integers(15, size - 15, 2))
            cv2.circle(img, (x, y), 10, (200, 190, 150), -1)
            cv2.circle(img, (x, y), 3, (120, 60, 70), -1)
        if i % 2:
            cv2.circle(img, (48, 48), 7, (90, 30, 40), -1)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": [36, 36, 24, 24]})
        cv2.imwrite(str(root / "train" / f"{i}.png"), img)
        images.append({"id": i, "file_name": f"{i}.png", "width": size, "height": size,
                       "truth": {"fov_grade": "HSIL" if i % 2 else "NILM"}})
    (root / "train.json").write_text(json.dumps({"info": {"um_per_px": 1.0}, "images": images,
                                                 "annotations": anns, "categories": [{"id": 1, "name": "hsil"}]}))
    return root


@pytest.mark.parametrize("cells", ["nuclei", "gt"])
def test_command_trains_from_a_coco_set(tmp_path, capsys, cells):
    data = _coco(tmp_path / "coco")
    rc = main(["train-grader", "--data", str(data), "--cells", cells, "--crop", "16", "--width", "4", "--hidden",
               "8", "--vit-dim", "8", "--vit-layers", "1", "--epochs", "1", "--val-fraction", "0.34",
               "--out", str(tmp_path / "out"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classes"] == ["NILM", "HSIL"] and out["fovs"] == 6
    assert out["cells_per_fov"] >= (4 if cells == "nuclei" else 0.5)
    assert (tmp_path / "out" / "grader.pt").is_file()


def test_command_refuses_missing_labels(tmp_path, capsys):
    data = _coco(tmp_path / "coco")
    (data / "grades.csv").write_text("file,grade\n0.png,NILM\n1.png,CIN3\n")
    assert main(["train-grader", "--data", str(data), "--labels", str(data / "grades.csv")]) == 2
    err = capsys.readouterr().err
    assert "grades.csv: line 3: grade" in err and "CIN3" in err
    (data / "grades.csv").write_text("file,grade\nother.png,NILM\n")
    assert main(["train-grader", "--data", str(data), "--labels", str(data / "grades.csv")]) == 2
    assert "no FOV labels" in capsys.readouterr().err


def test_merge_maps_grades_before_training(tmp_path):
    from cyto_edge.train.grade_train import build_fovset, fov_grades, parse_merge
    from cyto_edge.train.data.load import load_detection

    assert parse_merge("ASC-US=LSIL, scc=hsil") == {"ASC-US": "LSIL", "SCC": "HSIL"}
    with pytest.raises(BadInput, match="must look like ASC-US=LSIL"):
        parse_merge("ASC-US")
    ds = load_detection(_coco(tmp_path / "coco"), "train")
    fs = build_fovset(ds, fov_grades(ds), GraderSettings(cells="gt", crop=16, merge={"HSIL": "LSIL"}), progress=False)
    assert fs.classes == ["NILM", "LSIL"] and fs.cells["merge"] == {"HSIL": "LSIL"}


def test_frozen_classifier_backbone_is_cached_and_never_changes(tmp_path):
    from cyto_edge.train.cellcrops import CropSet
    from cyto_edge.train.classify import ClassifierSettings, build, checkpoint
    from cyto_edge.train.grade_train import build_model, cnn_features, collate, collate_features, fit

    cs = ClassifierSettings(arch="small", width=4, img_size=24)
    torch.manual_seed(0)
    clf = build(cs, 3)
    crops = CropSet(np.zeros((0, 24, 24, 3), np.uint8), np.zeros(0, np.int64), ["a", "b", "c"], source="t")
    torch.save(checkpoint(clf, cs, crops), tmp_path / "clf.pt")
    s = GraderSettings(crop=24, hidden=8, vit_dim=16, vit_layers=1, vit_heads=2, epochs=2, batch=4,
                       backbone_ckpt=str(tmp_path / "clf.pt"), freeze_backbone=True)
    fs = separable_fovs(12)
    fs.crops[3] = fs.crops[3][:0]                                        # a FOV without cells
    model = build_model(s, 2)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    assert all(torch.equal(before[f"cnn.{k}"], v) for k, v in clf.state_dict().items() if not k.startswith("fc."))
    model.eval()
    idx = [2, 3, 4, 5]
    with torch.no_grad():
        full = model(*collate(fs, idx)[:2])
        (x, maps, mask), _ = collate_features(cnn_features(model, fs), fs, idx, model.encoder.d_f)
        cached = model.forward_features(x, maps, mask)
    assert torch.allclose(full["probs"], cached["probs"], atol=1e-6)
    fit(model, fs, np.arange(12), np.zeros(0, np.int64), s)
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)        # weights and BN statistics
