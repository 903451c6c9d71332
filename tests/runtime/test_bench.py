"""`cyto-edge bench`: raw engine next to the pipeline on the same tiles, per-stage timings, CPU and memory."""
from __future__ import annotations

import json

from cyto_edge.cli import main
from cyto_edge.runtime.decode import tile_grid

SRC = "synth://?realtime=0&width=800&height=600&stops=2&fps=10&slide_width=2048&slide_height=1536"


def test_bench_reports_engine_and_pipeline_side_by_side(tiny_bundle, capsys):
    rc = main(["bench", str(tiny_bundle), "--source", SRC, "--frames", "2", "--threads", "1", "--live-frames", "8",
               "--um-per-px", "0.8", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["frame"] == [800, 600] and r["scale_factor"] == 0.8 and r["threads"] == 1 and r["batch"] == 8
    assert r["tiles_per_frame"] == len(tile_grid(480, 640, 320, r["overlap"]).tiles)      # 800x600 x 0.8
    assert r["raw"]["tiles_per_s"] > 0 and r["detect"]["tiles_per_s"] > 0 and r["grade"]["fov_per_s"] > 0
    assert r["ratio_detect_vs_raw"] > 0 and r["raw"]["batch_ms"]["p95"] >= r["raw"]["batch_ms"]["p50"] > 0
    assert {"rescale", "tile", "preprocess", "infer", "decode", "merge"} <= set(r["detect"]["stages_ms"])
    assert {"count", "grade", "total"} <= set(r["grade"]["stages_ms"])
    assert r["preview"]["pre_post_ms"]["p50"] > 0 and r["live"]["frames"] == 8 and r["live"]["frames_dropped"] >= 0
    assert r["cpu_percent"] > 0 and r["rss_mb"] > 0 and len(r["load_avg_before"]) == 3


def test_bench_without_frames_is_refused(tiny_bundle, tmp_path, capsys):
    assert main(["bench", str(tiny_bundle), "--source", f"file://{tmp_path / 'missing.mp4'}"]) == 2
    assert "missing.mp4" in capsys.readouterr().err
