"""The arithmetic of benchmarks/distillation.py and distill_sweep.py (no training): the summary's targets,
the per-epoch loss terms read from a trainer's metrics.csv, the sweep grid, and the schedule overrides."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _detection  # noqa: E402
import distill_sweep  # noqa: E402
import distillation  # noqa: E402


def test_summary_targets_met_when_the_teacher_learned():
    maps = {"student": [0.60, 0.62, 0.61], "+LD": [0.66, 0.67, 0.65], "teacher": [0.70, 0.72, 0.71]}
    s = distillation.summary(maps, {"student": 0.325, "+LD": 0.325, "teacher": 7.952})
    assert s["ld_gain_points"] == pytest.approx(5.0, abs=1e-6)
    assert s["pooled_std_points"] == pytest.approx(1.0, abs=1e-6)         # sample std 1 point in both rows
    assert s["ld_gain_over_std"] == pytest.approx(5.0, abs=1e-4)
    assert s["ld_fraction_of_teacher"] == pytest.approx(0.66 / 0.71, abs=1e-4)
    assert s["gflops_ratio"] == pytest.approx(0.325 / 7.952, abs=1e-4)
    assert s["targets"] == {"ld_gain_ge_2_points": True, "ld_gain_gt_2_std": True,
                            "ld_keeps_ge_90pct_of_teacher": True, "gflops_le_1_8_of_teacher": True}
    assert s["teacher_learned"] is True and s["counted"] is True and "note" not in s


def test_summary_small_gain_noisy_seeds_and_a_teacher_that_did_not_learn():
    maps = {"student": [0.30, 0.40, 0.35], "+LD": [0.33, 0.43, 0.38], "teacher": [0.45]}
    s = distillation.summary(maps, {"+LD": 1.0, "teacher": 4.0})
    assert s["ld_gain_points"] == pytest.approx(3.0, abs=1e-6)
    assert s["targets"]["ld_gain_ge_2_points"] is True
    assert s["targets"]["ld_gain_gt_2_std"] is False                       # std 5 points
    assert s["targets"]["gflops_le_1_8_of_teacher"] is False               # 1/4
    assert s["teacher_learned"] is False and s["counted"] is False
    assert "0.450 < 0.5" in s["note"]


def test_summary_one_seed_has_no_std_and_missing_rows_give_none():
    s = distillation.summary({"student": [0.5], "+LD": [0.53]}, {})
    assert s["pooled_std_points"] is None and s["ld_gain_over_std"] is None
    assert s["targets"]["ld_gain_gt_2_std"] is None and s["targets"]["ld_keeps_ge_90pct_of_teacher"] is None
    assert s["teacher_learned"] is None and s["counted"] is False


def test_loss_terms_from_the_trainers_metrics_csv(tmp_path):
    from cyto_edge.train.utils import MetricLog

    log = MetricLog(tmp_path, tensorboard=False)
    log.log(10, {"train_multibox": 4.0, "train_ld_fea": 1.5, "train_ld_att": 0.5, "train_total": 6.0, "epoch": 1})
    log.log(20, {"train_multibox": 2.0, "train_ld_fea": 0.9, "train_ld_att": 0.1, "train_total": 3.0, "epoch": 2,
                 "val_map50": 0.3})
    log.close()
    terms = _detection.loss_terms(tmp_path)
    assert [t["epoch"] for t in terms] == [1, 2]
    assert [t["ld_over_multibox"] for t in terms] == [pytest.approx(0.5), pytest.approx(0.5)]
    other = [{"epoch": 1, "multibox": 6.0, "ld_fea": 0.5, "ld_att": 0.5, "ld_over_multibox": 1 / 6},
             {"epoch": 2, "multibox": 4.0, "ld_fea": 1.0, "ld_att": 1.0, "ld_over_multibox": 0.5}]
    mean = _detection.mean_loss_terms([terms, other])
    assert mean["multibox"] == [5.0, 3.0] and mean["ld_fea"] == [1.0, 0.95]
    assert _detection.ratio_range(mean) == {"first": pytest.approx(1 / 3, abs=1e-5), "last": 0.5,
                                            "min": pytest.approx(1 / 3, abs=1e-5), "max": 0.5}
    assert _detection.ratio_range(_detection.mean_loss_terms([[{"epoch": 1, "multibox": 1.0}]])) is None


def test_sweep_grid_is_one_factor_at_a_time_around_the_defaults():
    from cyto_edge.train.config import DistillCfg

    d = DistillCfg().model_dump()
    g = distill_sweep.grid(d)
    assert len(g) + 1 <= 8                                                   # + the plain-student reference
    assert g[0][1] == {k: d[k] for k in distill_sweep.FACTORS}
    for name, values in g[1:]:
        changed = {k for k in distill_sweep.FACTORS if values[k] != d[k]}
        assert changed and (len(changed) == 1 or changed == {"alpha", "beta"}), name
    assert {v["temperature"] for _, v in g} == {0.5, 1.0}
    assert DistillCfg().model_dump() == d                                    # the sweep changes no default


def test_overrides_touch_only_schedule_data_seed_and_housekeeping(tmp_path):
    from cyto_edge.train.config import load_config

    one, steps = _detection.overrides("teacher_cpu", tmp_path, 3, 0.25, 2, tmp_path / "o", None)
    base = load_config("teacher_cpu", [f"data.root={tmp_path}"])
    assert steps == round(base.total_steps * 0.25) and f"schedule.steps_per_epoch={steps}" in one
    assert "schedule.epochs=1" in one
    per_epoch, total = _detection.overrides("student_ld", tmp_path, 0, 0.5, 2, tmp_path / "o", tmp_path / "t.pt",
                                            epochs=None)
    cfg = load_config("student_ld", per_epoch)
    ref = load_config("student_ld", [f"data.root={tmp_path}"])
    assert cfg.schedule.epochs == ref.schedule.epochs and total == cfg.total_steps
    assert abs(total - ref.total_steps * 0.5) <= ref.schedule.epochs
    assert cfg.optim == ref.optim and cfg.model == ref.model and cfg.aug == ref.aug and cfg.loss == ref.loss
    assert cfg.distill.model_dump(exclude={"teacher"}) == ref.distill.model_dump(exclude={"teacher"})


def test_a_given_teacher_needs_its_data_and_epochs_scale_the_student_schedule(tmp_path):
    st = distillation.settings(small=False)
    with pytest.raises(SystemExit, match="--teacher needs --data"):
        distillation.given_setting(st, tmp_path / "t.pt", None, None)
    with pytest.raises(SystemExit, match="no such checkpoint"):
        distillation.given_setting(st, tmp_path / "t.pt", tmp_path, None)
    (tmp_path / "t.pt").write_bytes(b"x")
    with pytest.raises(SystemExit, match="no usable test split"):
        distillation.given_setting(st, tmp_path / "t.pt", tmp_path / "nothing", None)
    with pytest.raises(SystemExit, match="at least 1"):
        distillation.given_setting(st, None, None, 0)
    got = distillation.given_setting(st, None, None, 40)           # 40 epochs of the recipe's 60 steps
    sets, total = _detection.overrides("student_cpu", tmp_path, 0, got["step_scale"], 1, tmp_path, None,
                                       epochs=got["epochs"])
    assert "schedule.epochs=40" in sets and "schedule.steps_per_epoch=60" in sets and total == 2400
    assert st["step_scale"] == 1.0 and "given_teacher" not in st        # the setting itself is not changed


def test_cached_train_runs_once_and_a_changed_override_trains_again(tmp_path, monkeypatch, synth_small):
    monkeypatch.setenv("CYTO_EDGE_CACHE", str(tmp_path / "cache"))
    trained = []
    real_train = _detection.train
    monkeypatch.setattr(_detection, "train", lambda recipe, sets: trained.append(sets) or real_train(recipe, sets))
    sets, total = _detection.overrides("tiny", synth_small, 0, 2 / 600, 1, tmp_path / "first", None, epochs=1)
    ckpt, secs, cmd, run = _detection.cached_train("tiny", sets)
    assert total <= 2 and ckpt.name == "last.pt" and ckpt.is_file() and secs > 0
    assert (run / "metrics.csv").is_file() and cmd.startswith("cyto-edge train tiny") and "out_dir" not in cmd
    moved = [s for s in sets if not s.startswith("out_dir=")] + [f"out_dir={tmp_path / 'second'}"]
    assert _detection.cached_train("tiny", moved)[0] == ckpt and len(trained) == 1   # out_dir is not in the key
    reseeded = [s.replace("seed=0", "seed=1") for s in sets]
    assert _detection.cached_train("tiny", reseeded)[0] != ckpt and len(trained) == 2


def test_a_given_teacher_must_have_been_trained_on_the_given_data(tiny_checkpoint, synth_small, tmp_path):
    import json

    st = distillation.settings(small=False)
    got = distillation.given_setting(st, tiny_checkpoint, synth_small, None)   # the fixture's own training set
    assert got["given_teacher"] == str(tiny_checkpoint)
    other = tmp_path / "other"                        # the same set with one train field fewer
    other.mkdir()
    d = json.loads((synth_small / "train.json").read_text())
    gone = d["images"].pop()["id"]
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] != gone]
    (other / "train.json").write_text(json.dumps(d))
    (other / "test.json").write_text((synth_small / "test.json").read_text())
    for sub in ("train", "test"):
        (other / sub).symlink_to(synth_small / sub)
    with pytest.raises(SystemExit, match="trained on another data set"):
        distillation.given_setting(st, tiny_checkpoint, other, None)
