"""The daemon in process, on a real port: pages, JSON API, exports, MJPEG, /metrics, bundle swaps, and an
API fuzz that must never produce a 500. One daemon (synth:// stage, tiny detector) serves the module."""
from __future__ import annotations

import csv
import io
import re
import shutil
import socket

import cv2
import httpx
import numpy as np
import pytest

from cyto_edge import DISCLAIMER
from tests.runtime.daemon.daemon_util import wait_for, write_profile

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
PROM_LINE = re.compile(rf'^(# (HELP|TYPE) {NAME} .+|{NAME}(\{{({NAME}="[^"\\]*",?)+\}})? (-?[0-9.]+(e[+-]?[0-9]+)?|NaN|[+-]Inf))$')


@pytest.fixture(scope="module")
def web(tmp_path_factory, graded_bundle):
    from cyto_edge.runtime.daemon.server import Daemon
    from cyto_edge.runtime.profile import load_profile

    d = Daemon(load_profile(write_profile(tmp_path_factory.mktemp("web"), graded_bundle)), port=0).start()
    with httpx.Client(base_url=d.url, timeout=30) as c:
        r = c.post("/api/sessions", json={"slide_id": "SLIDE-WEB-1", "operator": "Jane Roe",
                                           "notes": "first <script>alert(1)</script>"})
        assert r.status_code == 201, r.text
        wait_for(lambda: c.get("/api/status").json()["live"]["fovs_stored"] >= 3, 120, 0.3, "three stored FOVs")
        yield d, c, r.json()
    d.stop()


def test_session_fovs_are_stored_with_images_crops_and_provenance(web):
    d, c, sess = web
    st = c.get("/api/status").json()
    assert st["camera"]["state"] == "live" and st["engine"]["state"] == "ok" and st["disclaimer"] == DISCLAIMER
    assert st["session"]["slide_id"] == "SLIDE-WEB-1" and st["session"]["active_s"] > 0
    assert c.post("/api/sessions", json={"slide_id": "OTHER"}).status_code == 409
    fovs = c.get(f"/api/sessions/{sess['id']}/fovs").json()["fovs"]
    assert len(fovs) >= 3 and [f["seq"] for f in fovs] == list(range(1, len(fovs) + 1))
    f = c.get(f"/api/fovs/{fovs[0]['id']}").json()
    assert f["bundle_sha"] == st["engine"]["bundle_sha256"] and f["versions"]["cyto_edge"] and f["versions"]["onnxruntime"]
    assert f["grade_detail"]["grade"] == f["grade"] and 0 <= f["suspicion"] <= 1
    assert len(f["detections"]["boxes"]) == f["n_detections"] == len(f["detections"]["labels"]) > 0
    assert f["quality"]["focus"] == pytest.approx(f["focus"]) and f["timings"]["total"] > 0
    assert f["source"]["meta"]["stop_id"] is not None and f["captured_utc"].endswith("+00:00")
    img = cv2.imdecode(np.frombuffer(c.get(f"/api/fovs/{f['id']}/image.jpg").content, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (360, 480, 3)                              # full resolution
    assert f["cells"] and all(cell["crop_state"] == "stored" for cell in f["cells"])
    crop = c.get(f"/api/cells/{f['cells'][0]['id']}/crop.jpg")
    assert crop.headers["content-type"] == "image/jpeg" and cv2.imdecode(np.frombuffer(crop.content, np.uint8), 1) is not None


def test_the_fov_page_shows_the_learned_grade_and_the_graders_attention_per_cell(web):
    d, c, sess = web
    fovs = c.get(f"/api/sessions/{sess['id']}/fovs").json()["fovs"]
    f = c.get(f"/api/fovs/{fovs[0]['id']}").json()
    assert f["learned_grade"] in ("NILM", "LSIL", "HSIL") and f["learned"]["grade"] == f["learned_grade"]
    gc = f["extra"]["grader_cells"]                                 # stored: each cell's box and attention
    assert 0 < len(gc["boxes"]) == len(gc["attention"]) <= 16 and sum(gc["attention"]) == pytest.approx(1, abs=1e-3)
    assert all(b[0] < b[2] and b[1] < b[3] and 0 <= (b[0] + b[2]) / 2 <= 480 and 0 <= (b[1] + b[3]) / 2 <= 360
               for b in gc["boxes"])                                # cells of this 480x360 field
    html = c.get(f"/fovs/{f['id']}").text
    assert f"Learned grade: {f['learned_grade']}" in html and f"rule-based grade {f['grade']}" in html
    assert html.count('class="attn"') == len(gc["boxes"])            # every cell outlined on the image
    top = max(gc["attention"])
    assert f"<td>1</td><td>{top:.3f}</td>" in html                   # the most attended cell heads the table


def test_pages_summary_gallery_report_and_exports(web):
    d, c, sess = web
    sid = sess["id"]
    for path in ("/", "/sessions", f"/sessions/{sid}", f"/sessions/{sid}/gallery", f"/sessions/{sid}/report"):
        r = c.get(path)
        assert r.status_code == 200 and DISCLAIMER in r.text, path
    summ = c.get(f"/api/sessions/{sid}").json()["summary"]
    assert summ["n_fovs"] >= 3 and summ["adequacy"] in ("satisfactory", "unsatisfactory") and summ["adequacy_reason"]
    page = c.get(f"/sessions/{sid}").text
    assert summ["adequacy"] in page and summ["worst_grade"] in page and 'id="fov-table"' in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # escaped
    gal = c.get(f"/api/sessions/{sid}/gallery?n=100").json()["cells"]
    assert gal and [g["weight"] for g in gal] == sorted((g["weight"] for g in gal), reverse=True)
    assert gal[0]["weight"] == pytest.approx(summ["top_cells"][0]["weight"])   # the slide summary's ranking
    html = c.get(f"/sessions/{sid}/gallery").text
    assert html.count("/crop.jpg") >= 1 and f"/fovs/{gal[0]['fov_id']}" in html
    report = c.get(f"/sessions/{sid}/report").text
    assert report.count(DISCLAIMER) >= 3 and "SLIDE-WEB-1" in report and "Jane Roe" in report
    assert "@media print" in c.get("/static/style.css").text
    text = c.get(f"/api/sessions/{sid}/export.csv").text
    assert text.splitlines()[0] == f"# {DISCLAIMER}"
    rows = list(csv.DictReader(io.StringIO("\n".join(text.splitlines()[1:]))))
    n = len(c.get(f"/api/sessions/{sid}/fovs?limit=1000").json()["fovs"])
    assert len(rows) >= n >= 3 and rows[0]["slide_id"] == "SLIDE-WEB-1" and rows[0]["grade"]
    js = c.get(f"/api/sessions/{sid}/export.json").json()
    assert js["disclaimer"] == DISCLAIMER and len(js["fovs"]) >= n and js["fovs"][0]["detections"]["boxes"]


def test_mjpeg_parts_differ_and_metrics_are_prometheus_text(web):
    d, c, _ = web
    parts = []
    with c.stream("GET", "/stream.mjpg?fps=10") as r:
        assert r.headers["content-type"].startswith("multipart/x-mixed-replace; boundary=frame")
        buf = b""
        for chunk in r.iter_bytes():
            buf += chunk
            while b"\r\n\r\n" in buf and len(parts) < 3:
                head, rest = buf.split(b"\r\n\r\n", 1)
                n = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                if len(rest) < n + 2:
                    break
                parts.append(rest[:n])
                buf = rest[n + 2:]
            if len(parts) >= 3:
                break
    imgs = [cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR) for p in parts]
    assert all(i is not None and i.shape[1] == 480 for i in imgs)
    assert np.abs(imgs[0].astype(int) - imgs[-1].astype(int)).mean() > 0.5     # live: the picture changes
    text = c.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = text.text.strip().splitlines()
    bad = [ln for ln in lines if not PROM_LINE.match(ln)]
    assert not bad, bad
    vals = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in lines if not ln.startswith("#")}
    assert vals["cyto_edge_fovs_graded_total"] >= 3 and vals['cyto_edge_camera_state{state="live"}'] == 1
    assert vals['cyto_edge_engine_state{state="ok"}'] == 1 and vals["cyto_edge_fps"] > 0
    assert "cyto_edge_frames_dropped_total" in vals and 'cyto_edge_latency_seconds{quantile="0.95"}' in vals
    assert c.get("/healthz").json() == {"ok": True, "camera": "live", "engine": "ok"}
    assert d.sock.proto == socket.IPPROTO_TCP          # so that asyncio sets TCP_NODELAY on each connection


BAD = [
    ("POST", "/api/sessions", {"content": b"{"}), ("POST", "/api/sessions", {"content": b"[]"}),
    ("POST", "/api/sessions", {"content": b"null"}), ("POST", "/api/sessions", {"json": {"slide_id": 5}}),
    ("POST", "/api/sessions", {"json": {"slide_id": ""}}), ("POST", "/api/sessions", {"json": {"slide_id": "   "}}),
    ("POST", "/api/sessions", {"json": {"slide_id": "x" * 10000}}),
    ("POST", "/api/sessions", {"json": {"slide_id": "a\u0000b"}}), ("POST", "/api/sessions", {"json": {"slide_id": "a\nb"}}),
    ("POST", "/api/sessions", {"json": {"slide_id": "a", "extra": 1}}), ("POST", "/api/sessions", {"json": {"slide_id": None}}),
    ("POST", "/api/sessions", {"json": {"slide_id": ["a"]}}), ("POST", "/api/sessions", {"json": {"operator": "x"}}),
    ("POST", "/api/sessions", {"content": b"\xff\xfe\x00garbage", "headers": {"content-type": "application/json"}}),
    ("POST", "/api/sessions", {"content": b"slide_id=x", "headers": {"content-type": "application/x-www-form-urlencoded"}}),
    ("POST", "/api/sessions", {"content": b'{"slide_id": "' + b"a" * 70000 + b'"}'}),
    ("POST", "/api/sessions", {"content": b'{"slide_id": 1e999999}'}),
    ("GET", "/api/sessions/abc", {}), ("GET", "/api/sessions/-1", {}), ("GET", "/api/sessions/0", {}),
    ("GET", "/api/sessions/99999999999999999999999999", {}), ("GET", "/api/sessions/1e3", {}),
    ("GET", "/api/sessions/424242", {}), ("GET", "/api/fovs/%00", {}), ("GET", "/api/fovs/9223372036854775807", {}),
    ("GET", "/api/sessions?limit=-5", {}), ("GET", "/api/sessions?limit=abc", {}),
    ("GET", "/api/sessions?limit=100000000000000000000", {}), ("GET", "/api/sessions?offset=-1", {}),
    ("GET", "/api/sessions/1/fovs?order=evil", {}), ("GET", "/api/sessions/1/gallery?n=0", {}),
    ("GET", "/images/%2e%2e/%2e%2e/results.sqlite", {}), ("GET", "/images/..%2F..%2Fserve.lock", {}),
    ("GET", "/images/s000001/f000001-abcdef.jpg", {}), ("GET", "/images/%2Fetc%2Fpasswd", {}),
    ("GET", "/images/s000001/%2e%2e/%2e%2e/serve.lock", {}), ("GET", "/api/cells/1/crop.jpg/..", {}),
    ("GET", "/api/cells/77777777/crop.jpg", {}), ("GET", "/fovs/abc", {}), ("GET", "/sessions/0/report", {}),
    ("POST", "/api/bundle", {"json": {"path": 123}}), ("POST", "/api/bundle", {"json": {"path": "/nonexistent/b"}}),
    ("POST", "/api/bundle", {"json": {"path": "../../../etc"}}), ("POST", "/api/bundle", {"json": {"path": "a\u0000b"}}),
    ("POST", "/api/bundle", {"json": {"path": "x" * 5000}}), ("POST", "/api/bundle", {"json": {}}),
    ("POST", "/api/sessions/abc/stop", {}), ("POST", "/api/sessions/424242/stop", {}),
    ("DELETE", "/api/sessions", {}), ("PUT", "/api/status", {}),
    ("GET", "/stream.mjpg?fps=0", {}), ("GET", "/stream.mjpg?fps=nan", {}), ("GET", "/stream.mjpg?fps=1e308", {}),
]


def test_malformed_input_is_4xx_never_500(web):
    d, c, _ = web
    sha = c.get("/api/bundle").json()["sha256"]
    for method, path, kw in BAD:
        r = c.request(method, path, **kw)
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text[:200])
        assert r.headers["content-type"].startswith(("application/json", "text/html")), path
    rng = np.random.default_rng(0)
    for _ in range(40):                       # random bytes and random JSON values at every POST
        body = rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
        for path in ("/api/sessions", "/api/bundle", "/login"):
            assert c.post(path, content=body).status_code < 500
        val = [None, True, -1, 1e308, "x" * int(rng.integers(0, 200)), [], {}, {"a": [1]}][int(rng.integers(0, 8))]
        valid = isinstance(val, str) and 1 <= len(val) <= 128
        assert c.post("/api/sessions", json={"slide_id": val}).status_code == (409 if valid else 422)  # one is open
    assert c.get("/api/bundle").json()["sha256"] == sha       # nothing above changed the bundle
    assert c.get("/api/sessions/current").json()["slide_id"] == "SLIDE-WEB-1"


def test_bundle_swap_verified_old_kept_on_failure(web, tmp_path, gallery_bundle):
    from cyto_edge.runtime.bundle import Bundle, write_manifest

    d, c, sess = web
    old = c.get("/api/bundle").json()["sha256"]
    bad = tmp_path / "corrupt.cytobundle"
    shutil.copytree(gallery_bundle, bad)
    with open(bad / "model.onnx", "r+b") as f:          # flip bytes: the sha256 check must catch it
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    r = c.post("/api/bundle", json={"path": str(bad)})
    assert r.status_code == 422 and "sha256" in r.json()["detail"]
    assert c.get("/api/bundle").json()["sha256"] == old
    good = tmp_path / "renamed.cytobundle"
    shutil.copytree(gallery_bundle, good)
    m = Bundle.open(good).manifest
    m.name = "renamed for the swap test"
    write_manifest(good, m)
    r = c.post("/api/bundle", json={"path": str(good)})
    assert r.status_code == 200, r.text
    new = r.json()["sha256"]
    assert new != old and c.get("/api/status").json()["engine"]["bundle_sha256"] == new
    n0 = c.get(f"/api/sessions/{sess['id']}").json()["n_fovs"]
    wait_for(lambda: c.get(f"/api/sessions/{sess['id']}").json()["n_fovs"] >= n0 + 1, 120, 0.3, "a FOV after the swap")
    last = c.get(f"/api/sessions/{sess['id']}/fovs?order=desc&limit=1").json()["fovs"][0]
    assert last["bundle_sha"] == new
    kinds = [e["kind"] for e in c.get("/api/events").json()["events"]]
    assert "bundle_swapped" in kinds and "bundle_refused" in kinds


def test_stop_session_then_conflicts(web):
    d, c, sess = web
    r = c.post(f"/api/sessions/{sess['id']}/stop")
    assert r.status_code == 200 and r.json()["state"] == "closed" and r.json()["active_s"] > 0
    assert c.post(f"/api/sessions/{sess['id']}/stop").status_code == 409
    assert c.get("/api/sessions/current").status_code == 404
    assert c.get("/api/status").json()["session"] is None
    sessions = c.get("/api/sessions").json()["sessions"]
    assert sessions[0]["id"] == sess["id"] and sessions[0]["n_fovs"] >= 3
