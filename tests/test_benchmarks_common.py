"""The benchmark convention: emit's provenance line, the timer, the artefact cache (hit, miss, failed
build, two processes at once), run_all (ok, failing, timed-out and helper files) and make_table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _cache  # noqa: E402
import _common  # noqa: E402

FIELDS = {"benchmark", "figures", "command", "git", "time_utc", "cpu", "threads", "versions", "small", "extra"}


def _env(**kw) -> dict:
    return {**os.environ, "PYTHONPATH": str(BENCH), **{k: str(v) for k, v in kw.items()}}


def _run_script(code: str, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=_env(**env), timeout=120)


EMIT = """
from _common import emit, parser
args = parser("test").parse_args()
emit("unit", {"ms": 1.5, "n": 3}, ort_threads=2, model="tiny")
"""


def test_emit_line_has_every_field(tmp_path):
    out = tmp_path / "res.jsonl"
    r = _run_script(EMIT, "--small", "--seeds", "0,1", CYTO_EDGE_BENCH_OUT=out)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1
    rec = lines[0]
    assert FIELDS <= set(rec)
    assert rec["benchmark"] == "unit" and rec["figures"] == {"ms": 1.5, "n": 3}
    assert rec["command"].startswith(sys.executable) and rec["command"].endswith("--small --seeds 0,1")
    assert rec["threads"]["ort_threads"] == 2 and "OMP_NUM_THREADS" in rec["threads"]
    assert "torch" not in rec["threads"]                     # torch was not imported: not asked
    assert rec["extra"] == {"model": "tiny"} and rec["small"] is True
    if (ROOT / ".git").exists():
        assert len(rec["git"]["revision"]) == 40 and isinstance(rec["git"]["dirty"], bool)
    else:  # an exported tree: no revision to claim
        assert rec["git"] == {"revision": None, "dirty": None}
    assert rec["cpu"]["logical_cores"] == os.cpu_count() and rec["cpu"]["model"]
    assert rec["versions"]["numpy"] and "onnxruntime" in rec["versions"] and "torch" in rec["versions"]
    assert rec["time_utc"].endswith("+00:00")
    assert [json.loads(x) for x in out.read_text().splitlines()] == [rec]


def test_emit_records_torch_threads_when_torch_is_loaded(tmp_path):
    code = "import torch; torch.set_num_threads(1)\nfrom _common import emit\nemit('t', {'x': 1})\n"
    r = _run_script(code, OMP_NUM_THREADS=1)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["threads"]["torch"] == 1 and rec["threads"]["OMP_NUM_THREADS"] == "1"
    import torch

    assert rec["versions"]["torch"] == torch.__version__


def test_out_flag_sets_the_results_file(tmp_path):
    out = tmp_path / "sub" / "r.jsonl"
    r = _run_script(EMIT, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["benchmark"] == "unit"


def test_bad_seeds_is_a_usage_error():
    r = _run_script(EMIT, "--seeds", "a,b")
    assert r.returncode == 2 and "comma-separated integers" in r.stderr


def test_timer_statistics():
    calls = []
    t = _common.timer(lambda: (calls.append(1), time.sleep(0.002)), warmup=3, iters=20)
    assert len(calls) == 23 and t.iters == 20
    assert 2.0 <= t.min_ms <= t.p50_ms <= t.p95_ms and t.p50_ms < 50
    assert set(t.figures("lat")) == {"lat_p50", "lat_p95", "lat_mean"}


# ------------------------------------------------------------------------------------------ cache

@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CYTO_EDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_miss_then_hit(cache_env):
    builds = []

    def build(d: Path):
        builds.append(d)
        (d / "model.pt").write_text("weights")

    key = {"model": "ssdlite", "minutes": 1, "seed": 0}
    p1 = _cache.cached(key, build)
    p2 = _cache.cached(dict(reversed(list(key.items()))), build)   # same dict, other order: same key
    assert p1 == p2 and len(builds) == 1 and (p1 / "model.pt").read_text() == "weights"
    assert p1.parent == cache_env / "ckpt" and json.loads((p1 / _cache.KEY_FILE).read_text())["key"] == key
    p3 = _cache.cached({**key, "seed": 1}, build)
    assert p3 != p1 and len(builds) == 2
    assert _cache.cached(key, build, kind="bundle") != p1 and len(builds) == 3


def test_failed_build_leaves_nothing(cache_env):
    def broken(d: Path):
        (d / "half.pt").write_text("partial")
        raise RuntimeError("training diverged")

    with pytest.raises(RuntimeError):
        _cache.cached({"k": 1}, broken)
    leftovers = [p.name for p in (cache_env / "ckpt").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    p = _cache.cached({"k": 1}, lambda d: (d / "ok").write_text("1"))
    assert (p / "ok").exists()


def test_version_is_part_of_the_key(monkeypatch):
    import cyto_edge

    h1 = _cache.key_hash({"a": 1})
    monkeypatch.setattr(cyto_edge, "__version__", "999.0")
    assert _cache.key_hash({"a": 1}) != h1


def test_source_of_the_builder_is_part_of_the_key(monkeypatch):
    base = _cache.key_hash({"a": 1}, "ckpt")
    assert base == _cache.key_hash({"a": 1}, "ckpt") != _cache.key_hash({"a": 1})
    monkeypatch.setattr(_cache, "source_hash", lambda pkgs: "changed-" + ",".join(pkgs))
    assert _cache.key_hash({"a": 1}, "ckpt") != base


CONCURRENT = """
import sys, time
from pathlib import Path
from _cache import cached
log = Path(sys.argv[1])
def build(d):
    with open(log, "a") as f:
        f.write("build\\n")
    time.sleep(1.0)
    (d / "teacher.pt").write_text("t")
print(cached({"teacher": "shared"}, build))
"""


def test_two_processes_build_once(cache_env, tmp_path):
    log = tmp_path / "builds.log"
    env = _env(CYTO_EDGE_CACHE=cache_env)
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(log)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and Path(outs[0], "teacher.pt").read_text() == "t"
    assert log.read_text().count("build") == 1


# ------------------------------------------------------------------------------- run_all, make_table

def _bench_dir(tmp_path: Path) -> Path:
    d = tmp_path / "benches"
    d.mkdir()
    (d / "good.py").write_text("from _common import emit, parser\na = parser('g').parse_args()\n"
                               "emit('good', {'value': 1.25, 'small': a.small})\nemit('good', {'value': 2})\n")
    (d / "bad.py").write_text("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n")
    (d / "slow.py").write_text("import time\ntime.sleep(60)\n")
    (d / "silent.py").write_text("print('no results')\n")
    (d / "_helper.py").write_text("raise SystemExit('helpers are not benchmarks')\n")
    return d


def test_run_all_records_results_and_failures(tmp_path):
    d = _bench_dir(tmp_path)
    out = tmp_path / "results" / "latest.json"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--dir", str(d), "--out", str(out), "--timeout", "3"],
                       capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t0 < 60
    assert r.returncode == 1, r.stdout + r.stderr                  # failures are recorded, run completes
    rep = json.loads(out.read_text())
    assert {"started", "finished", "machine", "results", "failures"} <= set(rep)
    assert [x["figures"] for x in rep["results"]] == [{"value": 1.25, "small": True}, {"value": 2}]
    reasons = {f["benchmark"]: f["reason"] for f in rep["failures"]}
    assert reasons == {"bad": "failed", "slow": "timeout", "silent": "no results"}
    assert "boom" in next(f for f in rep["failures"] if f["benchmark"] == "bad")["log_tail"]
    assert rep["machine"]["cpu"]["logical_cores"] == os.cpu_count()
    assert {x["benchmark"]: x["result_lines"] for x in rep["runs"]} == {"bad": 0, "good": 2, "silent": 0, "slow": 0}

    table = subprocess.run([sys.executable, str(BENCH / "make_table.py"), str(out)], capture_output=True, text=True)
    assert table.returncode == 0
    assert "| good | value | 1.25 | `python " in table.stdout and "good.py --small` |" in table.stdout
    assert "slow (timeout)" in table.stdout


def test_run_all_budget_skips_the_rest(tmp_path):
    d = _bench_dir(tmp_path)
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(BENCH / "run_all.py"), "good", "slow", "--dir", str(d), "--out", str(out),
                    "--budget", str(2 / 60)], capture_output=True, text=True, timeout=120)
    rep = json.loads(out.read_text())
    assert rep["results"] and {f["benchmark"] for f in rep["failures"]} == {"slow"}


def test_make_table_rewrites_only_the_readme_block(tmp_path):
    import make_table

    report = {"machine": {}, "results": [{"benchmark": "decode", "figures": {"ms_p50": 0.41234},
                                          "command": f"{sys.executable} {BENCH}/decode.py --small"}], "failures": []}
    res = tmp_path / "latest.json"
    res.write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text("# T\nbefore\n<!-- bench-table -->\nold table\n<!-- /bench-table -->\nafter\n")
    assert make_table.main([str(res), "--write-readme", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# T\nbefore\n") and text.endswith("after\n")
    assert "| decode | ms_p50 | 0.4123 | `python benchmarks/decode.py --small` |" in text
    report["results"].append({"benchmark": "classifier", "figures": {"accuracy": 0.8}, "extra": {"row": "se+sam"},
                              "command": f"{sys.executable} {BENCH}/classifier.py --small"})
    res.write_text(json.dumps(report))
    assert make_table.main([str(res), "--write-readme", "--readme", str(readme)]) == 0
    assert "| classifier (se+sam) | accuracy | 0.8 |" in readme.read_text()
    readme.write_text("no markers\n")
    assert make_table.main([str(res), "--write-readme", "--readme", str(readme)]) == 2


def test_discovery_skips_helpers_and_runners():
    import run_all

    names = [p.stem for p in run_all.discover(BENCH)]
    assert "decode" in names and not {"run_all", "make_table", "_common", "_cache"} & set(names)


def test_decode_benchmark_small(tmp_path):
    out = tmp_path / "d.jsonl"
    r = subprocess.run([sys.executable, str(BENCH / "decode.py"), "--small", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text().splitlines()[0])
    f = rec["figures"]
    assert 20 <= f["candidates_mean"] <= 50 and 10 <= f["detections_mean"] <= f["candidates_mean"]
    assert 0 < f["ms_per_image_p50"] <= f["ms_per_image_p95"]
    assert rec["extra"]["priors"] == 3234
