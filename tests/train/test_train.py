"""Training mechanics on a toy set: learning, resume, DDP with two gloo processes, bad input, NaN guard,
Ctrl-C. (Learning on realistic synthetic fields: test_learning.py.)"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cyto_edge.cli import main
from cyto_edge.train.checkpoint import load_checkpoint
from cyto_edge.train.config import load_config
from cyto_edge.train.loop import Trainer

FAST = ["model.input_size=128", "optim.batch_size=8", "schedule.steps_per_epoch=8", "workers=0",
        "tensorboard=false", "data.val_fraction=0.2", "eval.tile_overlap=48", "optim.warmup_steps=4", "threads=1"]


def _cfg(toy, tmp_path, *extra):
    return load_config("tiny", [f"data.root={toy}", f"out_dir={tmp_path / 'runs'}", *FAST, *extra])


def test_training_writes_checkpoints_logs_and_is_deterministic(toy_coco, tmp_path):
    r1 = Trainer(_cfg(toy_coco, tmp_path, "schedule.epochs=2", "name=a")).run()
    r2 = Trainer(_cfg(toy_coco, tmp_path, "schedule.epochs=2", "name=b")).run()
    a, b = load_checkpoint(r1["last"]), load_checkpoint(r2["last"])
    assert a["step"] == 16 and a["epoch"] == 2
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k])
    out = tmp_path / "runs" / "a"
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 3 and "val_map50" in rows[0]
    assert (out / "best.pt").exists() and len(a["classes"]) == 11 and a["bethesda"]["hsil"] == "HSIL"
    assert a["priors"].shape == (1520, 4) and a["model"]["name"] == "tiny"
    assert a["um_per_px"] == 1.0 and a["dataset_fingerprint"]


class _StopAfterFirstEpoch(Trainer):
    def _end_epoch(self, *a, **k):
        super()._end_epoch(*a, **k)
        raise KeyboardInterrupt


def test_resume_continues_to_the_same_weights(toy_coco, tmp_path):
    full = Trainer(_cfg(toy_coco, tmp_path, "schedule.epochs=2", "name=full")).run()
    with pytest.raises(KeyboardInterrupt):
        _StopAfterFirstEpoch(_cfg(toy_coco, tmp_path, "schedule.epochs=2", "name=part")).run()
    assert load_checkpoint(tmp_path / "runs" / "part" / "last.pt")["step"] == 8
    resumed = Trainer(_cfg(toy_coco, tmp_path, "schedule.epochs=2", "name=part"), resume=True).run()
    assert resumed["steps"] == 16
    a, b = load_checkpoint(full["last"]), load_checkpoint(resumed["last"])
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-4, atol=1e-5)


def test_bad_config_and_mismatched_classes_exit_2_naming_the_field(toy_coco, tmp_path, capsys):
    assert main(["train", "tiny", "--set", f"data.root={toy_coco}", "--set", "optim.lr=fast"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["train", "tiny", "--set", f"data.root={toy_coco}", "--set", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert main(["train", "tiny", "--set", f"data.root={toy_coco}", "--set", "data.classes=[hsil,scc]",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "do not match" in err and "Traceback" not in err


def test_nan_loss_stops_naming_the_step_and_keeps_last_good(toy_coco, tmp_path, capsys):
    cfg = _cfg(toy_coco, tmp_path, "schedule.epochs=3", "name=nan")
    t = Trainer(cfg)
    orig = t.compute_losses

    def poisoned(batch):
        out = orig(batch)
        if t.step >= 10:
            out["total"] = out["total"] * float("nan")
        return out

    t.compute_losses = poisoned
    from cyto_edge.errors import CheckFailed

    with pytest.raises(CheckFailed, match="at step 10"):
        t.run()
    last = load_checkpoint(tmp_path / "runs" / "nan" / "last.pt")
    assert last["step"] == 8
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.dtype.is_floating_point)


def _cli(*args):
    return [sys.executable, "-m", "cyto_edge.cli", *args]


def test_ctrl_c_leaves_a_resumable_checkpoint(toy_coco, tmp_path):
    args = ["train", "tiny", "--out", str(tmp_path / "runs"), "--name", "int"]
    for s in FAST + [f"data.root={toy_coco}", "schedule.epochs=200"]:
        args += ["--set", s]
    p = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "runs" / "int" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.5)
    assert last.exists(), p.stderr.read() if p.poll() is not None else "no checkpoint in time"
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "resume" in err and "Traceback" not in err
    ck = load_checkpoint(last)
    assert ck["step"] >= 8
    r = subprocess.run(_cli(*args[:-2], "--set", "schedule.epochs=" + str(ck["step"] // 8 + 1), "--resume",
                            "--json", *sum((["--set", s] for s in FAST + [f"data.root={toy_coco}"]), [])),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == (ck["step"] // 8 + 1) * 8


def test_ddp_two_cpu_processes_with_gloo(toy_coco, tmp_path):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
            "-m", "cyto_edge.cli", "train", "tiny", "--out", str(tmp_path / "runs"), "--name", "ddp", "--json"]
    for s in FAST + [f"data.root={toy_coco}", "schedule.epochs=1", "threads=1", "device=cpu"]:
        args += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)                       # rank 0 prints the result
    assert res["world_size"] == 2 and res["ranks_in_sync"] is True
    ck = load_checkpoint(tmp_path / "runs" / "ddp" / "last.pt")
    assert ck["step"] == 8


def test_slim_checkpoint_keeps_the_model_drops_resume_state_and_refuses_resume(tiny_checkpoint, synth_small, tmp_path,
                                                                               capsys):
    from cyto_edge.train.checkpoint import model_from_checkpoint

    out = tmp_path / "slim.pt"
    assert main(["slim", str(tiny_checkpoint), str(out)]) == 0
    full, slim = load_checkpoint(tiny_checkpoint), load_checkpoint(out)
    assert "optimizer" not in slim and "ema_state_dict" not in slim
    assert slim["slim"] == {"weights": "ema", "dtype": "float16"}
    assert all(v.dtype == torch.float16 for v in slim["state_dict"].values() if v.is_floating_point())
    assert out.stat().st_size < tiny_checkpoint.stat().st_size / 4
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref, got = model_from_checkpoint(full)(x), model_from_checkpoint(slim)(x)
    for r, g in zip(ref, got):                     # fp16 rounding of the weights only
        assert (r - g).abs().max() <= 2e-3 * r.abs().max()
    assert main(["slim", str(out), str(out)]) == 2                      # would replace the input
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(out.read_bytes())
    cfg = load_config("tiny", [f"data.root={synth_small}", f"out_dir={tmp_path / 'runs'}",
                               "name=r", "workers=0", "tensorboard=false", "threads=1"])
    capsys.readouterr()
    with pytest.raises(Exception, match="slim checkpoint"):
        Trainer(cfg, resume=True).setup()
