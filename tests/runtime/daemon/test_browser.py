"""The pages in headless Chromium (Debian's chromium, driven over the DevTools pipe): the MJPEG live view
changes between two snapshots taken in the page, the gallery renders its crops, the report switches to its
print layout. Screenshots (and the report as PDF) are saved as test artifacts under $CYTO_EDGE_ARTIFACTS
(default tests/artifacts); CYTO_EDGE_UPDATE_DOCS=1 also refreshes docs/live_page.png and docs/gallery.png."""
from __future__ import annotations

import base64
import os
import shutil

import cv2
import httpx
import numpy as np

from cyto_edge import DISCLAIMER
from tests.conftest import require_binary
from tests.runtime.daemon.cdp import Browser
from tests.runtime.daemon.daemon_util import ARTIFACTS, DOCS, wait_for, write_profile

SNAPSHOT_JS = """(() => { const i = document.getElementById('live');
  const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
  c.getContext('2d').drawImage(i, 0, 0); return c.toDataURL('image/png'); })()"""
ALL_IMAGES_JS = "[...document.images].length > 0 && [...document.images].every(i => i.complete && i.naturalWidth > 0)"


def _decode(data_url: str) -> np.ndarray:
    raw = base64.b64decode(data_url.split(",", 1)[1])
    return cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)


def _save(name: str, data: bytes) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / name).write_bytes(data)
    if os.environ.get("CYTO_EDGE_UPDATE_DOCS") == "1" and name.endswith(".png"):
        DOCS.mkdir(exist_ok=True)
        shutil.copy(ARTIFACTS / name, DOCS / name)


def test_live_page_gallery_and_report_in_chromium(tmp_path, gallery_bundle, make_daemon):
    exe = require_binary("chromium", "chromium-browser")
    d = make_daemon(write_profile(tmp_path, gallery_bundle, pipeline={"preview_max_side": 640},
                                  camera={"kind": "synth", "seed": 0, "width": 640, "height": 480, "fps": 30,
                                          "realtime": False, "um_per_px": 1.0,
                                          "options": {"stops": 8, "dwell": 0.5, "move": 0.2, "loop": 1,
                                                      "slide_width": 2048, "slide_height": 1536}}))
    with httpx.Client(base_url=d.url, timeout=30) as c:
        sid = c.post("/api/sessions", json={"slide_id": "DEMO-SLIDE-7", "operator": "demo"}).json()["id"]
        wait_for(lambda: c.get("/api/status").json()["live"]["fovs_stored"] >= 3, 180, 0.3, "three stored FOVs")
    with Browser(exe) as b:
        page = b.new_page(d.url + "/")
        page.wait_js("document.getElementById('live') && document.getElementById('live').naturalWidth > 0", 60)
        page.wait_js("document.getElementById('graded').textContent !== '0'", 30)   # the status poll runs
        first = _decode(page.js(SNAPSHOT_JS))
        wait_for(lambda: np.abs(_decode(page.js(SNAPSHOT_JS)).astype(int) - first.astype(int)).mean() > 0.5,
                 30, 0.3, "the MJPEG picture to change")
        assert first.shape == (480, 640, 3) and first.std() > 10             # a real picture, not blank
        try:                                    # a picture of a still, sharp field reads better
            page.wait_js("document.getElementById('stage').textContent === 'still' && "
                         "document.getElementById('focus').value > 0.8", 20, 0.05)
        except TimeoutError:
            pass
        text = page.js("document.body.innerText")
        assert DISCLAIMER in text and "camera live" in text and "DEMO-SLIDE-7" in text
        _save("live_page.png", page.screenshot())

        page.goto(f"{d.url}/sessions/{sid}/gallery")
        page.wait_js(ALL_IMAGES_JS + " && document.querySelectorAll('#gallery .cell img').length >= 3", 60)
        sizes = page.js("[...document.querySelectorAll('#gallery .cell img')].map(i => [i.naturalWidth, i.clientHeight])")
        assert all(w > 0 and h > 0 for w, h in sizes)
        links = page.js("[...document.querySelectorAll('#gallery figcaption a')].map(a => a.getAttribute('href'))")
        assert links and all(h.startswith("/fovs/") for h in links)          # each cell with its FOV
        assert DISCLAIMER in page.js("document.body.innerText")
        _save("gallery.png", page.screenshot())

        page.goto(f"{d.url}/sessions/{sid}/report")
        page.wait_js("document.readyState === 'complete' && " + ALL_IMAGES_JS, 60)
        assert page.js("getComputedStyle(document.querySelector('header.top')).display") != "none"
        page.send("Emulation.setEmulatedMedia", {"media": "print"})
        assert page.js("getComputedStyle(document.querySelector('header.top')).display") == "none"
        assert page.js("document.body.innerText").count(DISCLAIMER) >= 3
        pdf = page.pdf()
        assert pdf.startswith(b"%PDF")
        _save("report.pdf", pdf)
