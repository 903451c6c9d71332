"""Faults the daemon must live through, in process on real ports: a bundle that fails verification (degraded,
then fixed by a swap), a camera that drops and returns, a full disk, and a network bind with a token."""
from __future__ import annotations

import shutil

import cv2
import httpx
import numpy as np
import pytest

from cyto_edge.errors import BadInput
from tests.conftest import require_module
from tests.runtime.daemon.daemon_util import MJPEGCamera, wait_for, write_profile

TOKEN = "0123456789abcdef-test-token"


def test_bad_bundle_at_start_is_degraded_until_a_good_one_is_swapped_in(tmp_path, gallery_bundle, make_daemon):
    bad = tmp_path / "bad.cytobundle"
    shutil.copytree(gallery_bundle, bad)
    (bad / "priors.npy").write_bytes(b"not the priors")
    d = make_daemon(write_profile(tmp_path, bad))
    with httpx.Client(base_url=d.url, timeout=30) as c:
        st = c.get("/api/status").json()
        assert st["engine"]["state"] == "error" and "priors.npy" in st["engine"]["error"]
        wait_for(lambda: c.get("/api/status").json()["camera"]["state"] == "live", 60, 0.2, "the camera")
        assert c.get("/snapshot.jpg").status_code == 200               # the camera is still shown
        page = c.get("/").text
        assert 'id="engine-alert"' in page and "priors.npy" in page
        assert 'cyto_edge_engine_state{state="error"} 1' in c.get("/metrics").text
        assert c.get("/healthz").json()["engine"] == "error"
        r = c.post("/api/bundle", json={"path": str(gallery_bundle)})
        assert r.status_code == 200 and r.json()["state"] == "ok"
        wait_for(lambda: c.get("/api/status").json()["live"]["fovs_graded"] >= 1, 120, 0.3, "a graded FOV")
        assert [e["kind"] for e in c.get("/api/events").json()["events"]][:2] == ["bundle_swapped", "engine_error"]


def test_engine_failing_while_grading_is_degraded_and_shown(tmp_path, gallery_bundle, make_daemon):
    """A model that only takes batches of one: the preview (one input) works, grading (4 tiles a batch) gets a
    real ONNX Runtime error; the daemon stays up, says "degraded" with the error, and keeps the live view."""
    from cyto_edge.runtime.bundle import Bundle, write_manifest

    onnx = require_module("onnx", "export")
    b = tmp_path / "batch1.cytobundle"
    shutil.copytree(gallery_bundle, b)
    m = onnx.load(b / "model.onnx")
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(m, b / "model.onnx")
    write_manifest(b, Bundle.open(b, verify=False).manifest)
    d = make_daemon(write_profile(tmp_path, b))
    with httpx.Client(base_url=d.url, timeout=30) as c:
        st = wait_for(lambda: (s := c.get("/api/status").json())["engine"]["state"] == "degraded" and s, 120, 0.2,
                      "the engine to be degraded")
        assert "invalid dimensions" in st["engine"]["error"].lower() and st["live"]["fovs_graded"] == 0
        assert c.get("/healthz").json() == {"ok": True, "camera": "live", "engine": "degraded"}
        assert 'id="engine-alert"' in c.get("/").text
        assert 'cyto_edge_engine_state{state="degraded"} 1' in c.get("/metrics").text
        errors = lambda: float(c.get("/metrics").text.split("\ncyto_edge_engine_errors_total ")[1].split()[0])  # noqa: E731
        wait_for(lambda: errors() >= 1, 10, 0.2, "the engine error counter")   # figures refresh twice a second
        assert c.get("/api/status").json()["live"]["fps"] > 0            # previews go on
        assert "engine_error" in [e["kind"] for e in c.get("/api/events").json()["events"]]


def test_camera_that_drops_and_returns(tmp_path, gallery_bundle, make_daemon):
    cam = MJPEGCamera("synth://?seed=1&width=320&height=240&realtime=0&loop=1&stops=4&slide_width=1024"
                      "&slide_height=768").start()
    try:
        cfg = {"kind": "opencv", "uri": f"http://127.0.0.1:{cam.port}/video.mjpg", "um_per_px": 1.0, "timeout_s": 5}
        d = make_daemon(write_profile(tmp_path, gallery_bundle, camera=cfg))
        with httpx.Client(base_url=d.url, timeout=30) as c:
            state = lambda: c.get("/api/status").json()["camera"]["state"]  # noqa: E731
            wait_for(lambda: state() == "live", 60, 0.2, "camera live")
            cam.stop()
            wait_for(lambda: state() == "lost", 60, 0.1, "camera lost")
            assert 'cyto_edge_camera_state{state="lost"} 1' in c.get("/metrics").text
            snap = cv2.imdecode(np.frombuffer(c.get("/snapshot.jpg").content, np.uint8), cv2.IMREAD_COLOR)
            assert snap.mean() < 60                                   # the dark "camera lost" frame
            sent = cam.sent
            cam.start()                                               # same port
            wait_for(lambda: state() == "live", 90, 0.2, "camera live again")
            assert cam.sent > sent
            assert c.get("/healthz").json()["ok"] is True
            assert "camera_lost" in [e["kind"] for e in c.get("/api/events").json()["events"]]
    finally:
        cam.stop()


def test_network_bind_requires_the_token_on_every_endpoint_but_healthz(tmp_path, gallery_bundle, make_daemon,
                                                                        monkeypatch):
    from cyto_edge.runtime.daemon.server import Daemon
    from cyto_edge.runtime.profile import load_profile

    prof = write_profile(tmp_path, gallery_bundle)
    with pytest.raises(BadInput, match="reachable from the network: a token is required"):
        Daemon(load_profile(prof), bind="0.0.0.0", port=0)
    monkeypatch.setenv("CYTO_EDGE_MIN_FREE_MB", str(10**12))          # and the disk is "full"
    d = make_daemon(prof, bind="0.0.0.0", token=TOKEN)
    base = f"http://127.0.0.1:{d.port}"
    with httpx.Client(base_url=base, timeout=30) as anon:
        assert anon.get("/healthz").status_code == 200
        for path in ("/api/status", "/api/sessions", "/metrics", "/stream.mjpg", "/snapshot.jpg", "/api/sessions/1",
                     "/images/s000001/f000001-abcdef.jpg", "/api/openapi.json", "/static/live.js"):
            r = anon.get(path)
            assert r.status_code == 401 and "token" in r.json()["detail"], path
        assert anon.post("/api/sessions", json={"slide_id": "X"}).status_code == 401
        assert anon.get("/api/status", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
        page = anon.get("/sessions", headers={"Accept": "text/html"})
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/sessions"
        assert anon.post("/login", content=b"token=nope&next=/sessions").text.count("Wrong token") == 1
        r = anon.post("/login", content=f"token={TOKEN}&next=//evil.example/".encode())
        assert r.status_code == 303 and r.headers["location"] == "/" and "cyto_edge_auth=" in r.headers["set-cookie"]
        assert "HttpOnly" in r.headers["set-cookie"] and TOKEN not in r.headers["set-cookie"]
        assert anon.get("/api/status").status_code == 200                 # the cookie now
    with httpx.Client(base_url=base, timeout=30) as c:
        r = c.get(f"/sessions?token={TOKEN}")
        assert r.status_code == 303 and r.headers["location"] == "/sessions" and "cyto_edge_auth" in r.headers["set-cookie"]
    with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        sid = c.post("/api/sessions", json={"slide_id": "DISKFULL-1"}).json()["id"]
        wait_for(lambda: c.get("/api/status").json()["live"]["fovs_stored"] >= 2, 120, 0.3, "FOVs stored")
        st = c.get("/api/status").json()
        assert st["disk"]["alert"]["kind"] == "disk_full"
        fovs = c.get(f"/api/sessions/{sid}/fovs").json()["fovs"]
        assert fovs and all(f["image_state"] == "not_saved" for f in fovs)       # results kept, no images
        assert c.get(f"/api/fovs/{fovs[0]['id']}/image.jpg").status_code == 404
        assert 'cyto_edge_disk_alert{kind="disk_full"} 1' in c.get("/metrics").text
        assert 'id="disk-alert"' in c.get("/").text
        monkeypatch.setenv("CYTO_EDGE_MIN_FREE_MB", "1")                       # space again
        n = len(fovs)
        wait_for(lambda: c.get(f"/api/sessions/{sid}/fovs?order=desc&limit=1").json()["fovs"][0]["seq"] > n + 1,
                 120, 0.3, "more FOVs")
        assert c.get(f"/api/sessions/{sid}/fovs?order=desc&limit=1").json()["fovs"][0]["image_state"] == "stored"
        assert c.get("/api/status").json()["disk"]["alert"] is None
