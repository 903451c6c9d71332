"""`cyto-edge eval BUNDLE`: runs without torch, measures what the checkpoint evaluation measures, and grades
FOVs against synth's per-image truth."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cyto_edge.cli import main

BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError("torch is not installed on this device: " + name)
sys.meta_path.insert(0, Block())
from cyto_edge.cli import main
rc = main(sys.argv[1:])
loaded = [m for m in ("torch", "torchvision", "cyto_edge.train.evaluate", "cyto_edge.train.checkpoint") if m in sys.modules]
print("LOADED", loaded, file=sys.stderr)
sys.exit(rc if not loaded else 99)
"""


def _eval_without_torch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_box_level_eval_of_a_bundle_runs_without_torch(tiny_bundle, synth_small, tmp_path):
    out = tmp_path / "ev"
    r = _eval_without_torch(tiny_bundle, "--data", synth_small, "--split", "test", "--out", out, "--json",
                            "--engine", "onnxruntime", "--max-images", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LOADED []" in r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m == json.loads(r.stdout)
    assert m["n_images"] == 2 and m["level"] == "box" and m["engine"] == "onnxruntime"
    assert set(m["classes"]) == {"ascus", "asch", "lsil", "hsil", "scc", "agc", "trichomonas", "candida", "flora",
                                 "herps", "actinomyces"}
    assert "map50" in m and "map" in m and (out / "pr_all.png").stat().st_size > 1000


def test_bundle_and_checkpoint_evaluations_agree(tiny_bundle, tiny_checkpoint, synth_small, tmp_path, capsys):
    pytest.importorskip("torch")
    assert main(["eval", str(tiny_checkpoint), "--data", str(synth_small), "--split", "test", "--max-images", "1", "--json"]) == 0
    ck = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tiny_bundle), "--data", str(synth_small), "--split", "test", "--max-images", "1", "--json"]) == 0
    bu = json.loads(capsys.readouterr().out)
    for name, c in ck["classes"].items():
        b = bu["classes"][name]
        assert c["n_gt"] == b["n_gt"]
        assert abs(c["n_det"] - b["n_det"]) <= max(2, 0.02 * c["n_det"])         # float noise at the 0.05 cut
        if c["ap50"] is not None:
            assert b["ap50"] == pytest.approx(c["ap50"], abs=0.02)
    assert (bu["map50"] or 0) == pytest.approx(ck["map50"] or 0, abs=0.01)


def test_fov_level_eval_gives_sensitivity_and_specificity(tiny_bundle, synth_small, tmp_path):
    out = tmp_path / "fov"
    r = _eval_without_torch(tiny_bundle, "--data", synth_small, "--split", "test", "--level", "fov", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    truth = [im["truth"]["fov_grade"] for im in json.loads((synth_small / "test.json").read_text())["images"]]
    assert m["n_fovs"] == len(truth) == 3
    for pos in ("ASC-US", "LSIL"):
        f = m["rule"][pos]
        assert f["tp"] + f["fn"] + f["tn"] + f["fp"] == 3 and f["positive"] == pos
        assert sum(map(sum, f["confusion"])) == 3
    assert 0 <= m["squamous_count"]["mean_abs_rel_error"] < 1 and "sensitivity" in r.stderr


def test_eval_refuses_what_it_cannot_measure(tiny_bundle, toy_coco, tmp_path, capsys):
    assert main(["eval", str(tiny_bundle), "--data", str(toy_coco), "--split", "test", "--level", "fov"]) == 2
    assert "truth.fov_grade" in capsys.readouterr().err
    coco = json.loads((toy_coco / "test.json").read_text())
    coco["categories"][0]["name"] = "koilocyte"
    other = tmp_path / "other"
    other.mkdir()
    (other / "test.json").write_text(json.dumps(coco))
    (other / "test").symlink_to(toy_coco / "test")
    (other / "train.json").write_text((toy_coco / "train.json").read_text())
    (other / "train").symlink_to(toy_coco / "train")
    rc = main(["eval", str(tiny_bundle), "--data", str(other), "--split", "test"])
    err = capsys.readouterr().err
    assert rc == 2 and "koilocyte" in err and "Traceback" not in err
