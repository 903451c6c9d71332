"""`cyto-edge demo`: the whole chain, really run (every step a real command in its own process), at a size
smaller than --quick so that the module stays near a minute; then its outputs opened, a failing step,
the refusals of an existing OUT, and `--serve` on the finished result."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cyto_edge import DISCLAIMER
from cyto_edge.demo.plan import QUICK, STEPS

# the quick demo, smaller still: tiny models for a few steps, a 640x480 camera over two stops
SMOKE = dataclasses.replace(
    QUICK, name="smoke", images=8, image_size=512, slide_size="1280x960", stops=2, val_fraction=0.25, val_images=2,
    teacher_steps=4, teacher_batch=4, student_steps=4, student_batch=4, bag_proposals=50, calib_images=4,
    gate_images=2, test_images=2)


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "cyto_edge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from rich.console import Console

    from cyto_edge.demo.core import run_demo

    out = tmp_path_factory.mktemp("demo") / "out"
    log = io.StringIO()
    res = run_demo(out, SMOKE, console=Console(file=log, width=200), threads=2)
    return out, res, log.getvalue()


def test_every_step_ran_and_logged(demo):
    out, res, shown = demo
    assert [s["key"] for s in res["steps"]] == [k for k, _ in STEPS]
    for i, s in enumerate(res["steps"], 1):
        log = Path(s["log"])
        assert log.name == f"{i:02d}-{s['key']}.log" and log.parent == out / "logs"
        first = log.read_text().splitlines()[0]
        assert first.startswith("$ cyto-edge ") or first.startswith("$ python -m cyto_edge.demo.tasks ")
        assert f"[{i}/{len(STEPS)}] {s['title']}" in shown
    codes = [s["exit_code"] for s in res["steps"]]
    assert codes[4] in (0, 1) and codes[:4] + codes[5:] == [0] * 8      # export: 1 when the gate refuses
    assert json.loads((out / "summary.json").read_text())["outputs"] == res["outputs"]
    assert json.loads((out / ".cyto-edge-demo").read_text())["finished"]


def test_report_page_opens_standalone(demo):
    out, res, _ = demo
    html = Path(res["outputs"]["report"]).read_text()
    assert DISCLAIMER in html and "Slide screening report" in html
    assert "<style>" in html and "/static/" not in html and 'href="/' not in html   # opens from the disk
    rep = json.loads((out / "report.json").read_text())
    assert rep["summary"]["n_fovs"] >= 1 and len(rep["fovs"]) == rep["summary"]["n_fovs"]
    assert rep["unsaved"] == 0
    # the daemon graded the same frames as `run`: same FOVs, same grades
    assert [f["grade"] for f in rep["fovs"]] == [f["grade"] for f in res["run"]["fovs"]]
    for cell in rep["gallery"]:
        if cell["crop_state"] == "stored":
            assert "data:image/jpeg;base64," in html


def test_video_and_pr_curves_open(demo):
    import cv2

    _, res, _ = demo
    cap = cv2.VideoCapture(res["outputs"]["video"])
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.ndim == 3 and n > 0 and n == res["run"]["video_frames"] == res["run"]["frames"]
    png = cv2.imread(res["outputs"]["pr_curves"])
    assert png is not None and png.shape[0] > 100 and png.shape[1] > 100


def test_gate_result_decides_the_precision(demo):
    out, res, shown = demo
    ex = res["export"]
    manifest = json.loads((out / "demo.cytobundle" / "manifest.json").read_text())
    assert manifest["quality"]["gate"]["passed"] is ex["gate_passed"]
    passed = {r["precision"]: r["passed"] for r in ex["files"].values()}
    assert ex["run_precision"] == ("int8" if passed["int8-qdq"] else "fp32")
    assert res["test"]["precision"] == ex["run_precision"]
    if not ex["gate_passed"]:      # refused: said plainly, and the demo went on
        assert "gate FAILED" in shown and "the demo goes on with its" in shown and ex["failed"]
        assert res["steps"][4]["exit_code"] == 1
    profile = (out / "profiles" / "report.yaml").read_text()
    assert f"precision: {ex['run_precision']}" in profile


def test_summary_printed(demo):
    from rich.console import Console

    from cyto_edge.demo.summary import print_summary

    _, res, _ = demo
    buf = io.StringIO()
    print_summary(res, Console(file=buf, width=200))
    text = buf.getvalue()
    assert DISCLAIMER in text and "worst grade" in text and "adequacy" in text and "top suspicious cells" in text
    for key in ("report", "video", "pr_curves"):
        assert res["outputs"][key] in text
    assert len(re.findall(r"^\s+\d+ │", text, re.M)) == len(res["run"]["fovs"])     # one row per FOV


def test_existing_out_refused_without_force(demo, tmp_path):
    out, _, _ = demo
    r = cli("demo", "--quick", "--out", out)
    assert r.returncode == 2 and "finished" in r.stderr and "--force" in r.stderr and "Traceback" not in r.stderr
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    r = cli("demo", "--quick", "--force", "--out", other)
    assert r.returncode == 2 and "not made by `cyto-edge demo`" in r.stderr
    assert (other / "notes.txt").read_text() == "keep me"


def test_failing_step_names_step_and_log(tmp_path):
    out = tmp_path / "fails"
    r = cli("demo", "--quick", "--out", out, "--teacher", "no_such_recipe")
    assert r.returncode == 1, r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in r.stderr
    log = out / "logs" / "03-teacher.log"
    assert "'train the teacher' failed (exit 2)" in line[0] and str(log) in line[0]
    assert "no_such_recipe" in line[0]                           # the step's own reason
    assert "no shipped recipe of that name" in log.read_text()
    assert (out / "logs" / "01-synth.log").is_file() and not (out / "logs" / "04-student.log").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_a_finished_demo(demo):
    import httpx

    out, _, _ = demo
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cyto_edge.cli", "demo", "--serve", "--out", str(out),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, t0, health = f"http://127.0.0.1:{port}", time.monotonic(), None
        while time.monotonic() - t0 < 60 and proc.poll() is None:
            try:
                health = httpx.get(url + "/healthz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None and health.status_code == 200, proc.stdout.read() if proc.poll() is not None else ""
        sessions = httpx.get(url + "/api/sessions", timeout=5).json()["sessions"]
        assert {s["slide_id"] for s in sessions} >= {"DEMO-SLIDE", "DEMO-SLIDE-LIVE"}   # the report's and a live one
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
