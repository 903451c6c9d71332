"""Jigsaw pretraining: permutation sets, puzzles, learning, the frame scan, weight transfer, patch attention."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from cyto_edge.cli import main
from cyto_edge.errors import BadInput
from cyto_edge.train.models.jigsaw import (PatchAttentionClassifier, build_trunk, hamming_permutations,
                                           permutation_stats, split_patches)
from cyto_edge.train.models.rcan import build_classifier
from cyto_edge.train.pretrain import (PretrainConfig, PuzzleSpec, cut_puzzle, jigsaw_accuracy,
                                      load_pretrained_backbone, pretrain, save_pretrained, scan_frames)

TRUNK = {"widths": [8, 16, 32], "groups": 1, "blocks": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _structured(folder, n=8, size=96, seed=0):
    """Frames whose layout repeats (a ring and lines), colours and noise vary: each tile's place is learnable."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.full((size, size, 3), rng.integers(150, 255, 3), np.uint8)
        col = tuple(int(v) for v in rng.integers(0, 120, 3))
        c = size // 2
        cv2.circle(img, (c, c), int(size * 0.4), col, 3)
        cv2.line(img, (0, 0), (size, size), col, 3)
        cv2.line(img, (c, 0), (c, size), col, 2)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"frame-{i:03d}.png"), img)
    return folder


@pytest.mark.parametrize("n", [2, 30])
def test_permutation_set(n):
    p = hamming_permutations(n, seed=0)
    s = permutation_stats(p)
    assert p.shape == (n, 9) and s["count"] == n and s["unique"] == n
    assert all(sorted(row) == list(range(9)) for row in p.tolist())
    d = (p[:, None] != p[None]).sum(2)
    assert s["min_hamming"] == d[np.triu_indices(n, 1)].min()


def test_max_min_criterion_beats_average_on_minimum_distance():
    a = permutation_stats(hamming_permutations(30, seed=0, criterion="average"))
    m = permutation_stats(hamming_permutations(30, seed=0, criterion="minimum"))
    assert m["min_hamming"] >= 6 > a["min_hamming"]
    assert a["mean_hamming"] >= m["mean_hamming"]     # Algorithm 1 as printed maximises the average


def test_puzzle_tiles_follow_the_permutation():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)    # exactly 3 cells: the crop is the image
    spec = PuzzleSpec(cell=16, tile=16, channel_jitter=0, gray_p=0.0)
    perm = np.array([8, 0, 7, 1, 6, 2, 5, 3, 4])
    tiles = cut_puzzle(img, perm, spec, rng)
    assert tiles.shape == (9, 3, 16, 16)
    np.testing.assert_allclose(tiles.mean(axis=(2, 3)), 0, atol=1e-4)     # per-tile, per-channel normalised
    np.testing.assert_allclose(tiles.std(axis=(2, 3)), 1, atol=1e-3)
    r, q = divmod(int(perm[0]), 3)
    cell = img[r * 16:(r + 1) * 16, q * 16:(q + 1) * 16].transpose(2, 0, 1).astype(np.float32)
    ref = (cell - cell.mean((1, 2), keepdims=True)) / cell.std((1, 2), keepdims=True)
    np.testing.assert_allclose(tiles[0], ref, atol=1e-4)


def test_jigsaw_learns_above_chance(tmp_path):
    frames = _structured(tmp_path / "frames", n=8)
    spec = PuzzleSpec(cell=32, tile=28)
    cfg = PretrainConfig(arch="plain", trunk_kwargs=TRUNK, epochs=3, num_perms=10, per_image=16, batch_size=16,
                         lr=3e-3, puzzle=spec)
    scan = scan_frames(frames, spec.crop)
    net, stats = pretrain(scan.usable, cfg)
    acc = jigsaw_accuracy(net, scan.usable, spec, hamming_permutations(10, 0), n=96, seed=5)
    assert acc > 3 * stats["chance"], (acc, stats["history"])
    assert stats["permutations"]["unique"] == 10


def test_scan_counts_unreadable_and_refuses_small(tmp_path, capsys):
    root = _structured(tmp_path / "store", n=2)
    (root / "sub").mkdir()
    (root / "sub" / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "sub" / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not a frame")
    cv2.imwrite(str(root / "sub" / "thumb.bmp"), np.zeros((40, 200, 3), np.uint8))
    cv2.imwrite(str(root / "frame-000.png.explain.png"), np.zeros((200, 200, 3), np.uint8))   # an overlay
    scan = scan_frames(root, 96)
    assert len(scan.usable) == 2 and len(scan.unreadable) == 2 and len(scan.too_small) == 1
    p, w, h = scan.too_small[0]
    msg = scan.too_small_message(p, w, h)
    assert "thumb.bmp" in msg and "200x40" in msg and "96x96" in msg
    # the command refuses a folder with nothing large enough, naming the file and the minimum size
    assert main(["pretrain", "--unlabeled", str(root / "sub"), "--cell", "32"]) == 2
    err = capsys.readouterr().err
    assert "thumb.bmp" in err and "96x96" in err and "torn.png" in err


def test_pretrain_command_and_transfer(tmp_path, capsys):
    frames = _structured(tmp_path / "frames", n=5)
    (frames / "bad.jpg").write_bytes(b"garbage")
    out = tmp_path / "pre.pt"
    args = ["pretrain", "--unlabeled", str(frames), "--arch", "plain", "--arch-kw", "widths=[8,16,32]",
            "--arch-kw", "groups=1", "--arch-kw", "blocks=1", "--cell", "32", "--epochs", "1", "--permutations", "5",
            "--per-image", "2", "--out", str(out), "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["scan"]["unreadable"] == 1 and res["scan"]["usable"] == 5 and out.is_file()
    saved = torch.load(out, weights_only=False)["state_dict"]
    weights = [k for k in saved if not k.endswith("num_batches_tracked")]
    clf = build_classifier("plain", 4, **TRUNK)
    matched, missing = load_pretrained_backbone(clf, out)
    assert len(matched) == len(weights) and missing == []
    assert torch.equal(clf.state_dict()["stem.0.weight"], saved["stem.0.weight"])
    pac = PatchAttentionClassifier(build_trunk("plain", **TRUNK), 2)
    matched, _ = load_pretrained_backbone(pac, out)
    assert len(matched) == len(weights) and all(k.startswith("trunk.body.") for k in matched)
    wrong = build_classifier("plain", 4, widths=[16, 32, 64], groups=1, blocks=1)
    matched, missing = load_pretrained_backbone(wrong, out)
    assert len(missing) == len(weights) - len(matched) and len(matched) < len(weights) // 2
    with pytest.raises(BadInput, match="no such pretrained"):
        load_pretrained_backbone(clf, tmp_path / "nope.pt")


def test_detector_backbone_transfer(tmp_path):
    det_mod = pytest.importorskip("cyto_edge.train.models.detector")
    frames = _structured(tmp_path / "frames", n=2, size=64)
    cfg = PretrainConfig(arch="tiny", trunk_kwargs={"width": 8}, epochs=1, num_perms=4, per_image=2, batch_size=4,
                         puzzle=PuzzleSpec(cell=20, tile=18))
    net, stats = pretrain(scan_frames(frames, 60).usable, cfg)
    path = save_pretrained(tmp_path / "pre.pt", net, cfg, stats)
    det = det_mod.create_model("tiny", num_classes=3, input_size=128, width=8)
    expected = [k for k in det.backbone.state_dict() if not k.endswith("num_batches_tracked")]
    matched, missing = load_pretrained_backbone(det, path)
    assert missing == [] and sorted(matched) == sorted("backbone." + k for k in expected)


def test_patch_attention_weights_in_unit_interval():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 48, 48)
    pac = PatchAttentionClassifier(build_trunk("plain", **TRUNK), 3)
    y = pac(x)
    w = pac.last_patch_weights
    assert y.shape == (4, 3) and w.shape == (4, 9) and (w > 0).all() and (w < 1).all()
    y.sum().backward()
    assert pac.attention.fc.weight.grad is not None and pac.attention.fc.weight.grad.abs().sum() > 0
    plain = PatchAttentionClassifier(build_trunk("plain", **TRUNK), 3, attention=False)
    plain(x)
    assert plain.last_patch_weights is None


def test_split_patches_row_major():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    p = split_patches(x)
    assert p.shape == (2, 9, 3, 2, 2)
    assert torch.equal(p[:, 5], x[:, :, 2:4, 4:6])     # patch 5 = row 1, column 2
