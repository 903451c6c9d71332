"""`cyto-edge run` on synth://, a video file and a folder: the annotated mp4 and the JSON lines are written."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from cyto_edge.cli import main
from cyto_edge.runtime.sources import open_source

SYNTH = "synth://?seed=1&width=640&height=480&stops=6&fps=12&slide_width=2048&slide_height=1536"


def _lines(path):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return rows[:-1], rows[-1]


def _frames(path):
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def test_run_on_synth_writes_the_video_and_one_line_per_fov(tiny_bundle, tmp_path, capsys):
    out, jl = tmp_path / "run.mp4", tmp_path / "fovs.jsonl"
    uri = SYNTH + "&realtime=0"
    rc = main(["run", str(tiny_bundle), "--source", uri, "--out", str(out), "--jsonl", str(jl), "--json",
               "--threads", "1"])
    assert rc == 0
    fovs, last = _lines(jl)
    with open_source(uri) as src:
        non_empty = {s["id"] for s in src.schedule if not s["empty"]}
    assert sorted(f["source_meta"]["stop_id"] for f in fovs) == sorted(non_empty)        # once each
    for f in fovs:
        assert f["grade"] in ("NILM", "ASC-US", "LSIL", "ASC-H", "AGC", "HSIL", "SCC")
        assert {"suspicion", "class_counts", "top_detections", "timings_ms", "quality", "squamous_count"} <= set(f)
        assert f["timings_ms"]["infer"] > 0 and f["bundle_sha"] == last["bundle_sha"]
    s = last["summary"]
    assert s["n_fovs"] == len(fovs) and s["adequacy"] in ("satisfactory", "unsatisfactory")
    assert s["squamous_total"] == sum(f["squamous_count"] for f in fovs)
    printed = json.loads(capsys.readouterr().out)
    assert printed["stats"]["frames"] == last["stats"]["frames"] == last["video_frames"] == _frames(out) > 50


def test_run_on_a_video_file(tiny_bundle, tmp_path):
    video = tmp_path / "slide.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 12, (640, 480))
    with open_source(SYNTH + "&realtime=0&stops=3") as src:
        n = 0
        for f in iter(src.read, None):
            w.write(f.image)
            n += 1
    w.release()
    out, jl = tmp_path / "annotated.mp4", tmp_path / "v.jsonl"
    assert main(["run", str(tiny_bundle), "--source", f"file://{video}", "--out", str(out), "--jsonl", str(jl),
                 "--um-per-px", "1.0"]) == 0
    fovs, last = _lines(jl)
    assert 1 <= len(fovs) <= 3 and last["stats"]["frames"] == n == _frames(out)
    assert len({f["frame_index"] for f in fovs}) == len(fovs)


def test_run_on_a_folder_grades_every_image(tiny_bundle, tmp_path, real_frame, capsys):
    d = tmp_path / "fields"
    d.mkdir()
    for i in range(3):
        cv2.imwrite(str(d / f"{i}.png"), np.roll(real_frame(400, 300), 40 * i, axis=0))
    jl = tmp_path / "f.jsonl"
    assert main(["run", str(tiny_bundle), "--source", f"folder://{d}", "--jsonl", str(jl), "--show"]) == 0
    fovs, last = _lines(jl)
    assert [f["source_meta"]["name"] for f in fovs] == ["0.png", "1.png", "2.png"]
    assert "--show" in capsys.readouterr().err                             # no display here: said, not fatal


def test_run_with_a_profile_and_max_frames(tiny_bundle, tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("name: t\ncamera: {kind: synth, um_per_px: 1.0, width: 640, height: 480, realtime: true,\n"
                 "  options: {slide_width: 2048, slide_height: 1536}}\n"
                 f"engine: {{backend: onnxruntime, threads: 1}}\nbundle: {tiny_bundle}\n")
    jl = tmp_path / "p.jsonl"
    assert main(["run", str(tiny_bundle), "--profile", str(p), "--max-frames", "15", "--jsonl", str(jl)]) == 0
    _, last = _lines(jl)
    assert last["stats"]["frames"] == 15 and last["stats"]["live"] is True


@pytest.mark.parametrize("args,msg", [
    (["--source", "synth://", "--fov", "sometimes"], "--fov 'sometimes'"),
    ([], "give --source"),
    (["--source", "file:///nonexistent/slide.mp4"], "nonexistent"),
    (["--source", "synth://?fps=0"], "fps"),
])
def test_run_refuses_bad_usage_in_one_line(tiny_bundle, args, msg, capsys):
    assert main(["run", str(tiny_bundle), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
