"""Helpers for the daemon tests: small synth:// profiles, waiting, `cyto-edge serve` as a process, an HTTP
camera that can drop and return."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

CLI = [sys.executable, "-m", "cyto_edge.cli"]
ARTIFACTS = Path(os.environ.get("CYTO_EDGE_ARTIFACTS", Path(__file__).resolve().parents[2] / "artifacts"))
DOCS = Path(__file__).resolve().parents[3] / "docs"

SYNTH = {"stops": 8, "dwell": 0.5, "move": 0.2, "loop": 1, "slide_width": 1536, "slide_height": 1152}


def write_profile(dir_: Path, bundle: Path, *, camera: dict | None = None, storage: dict | None = None,
                  server: dict | None = None, pipeline: dict | None = None, name: str = "profile.yaml") -> Path:
    """A desktop profile over a small synth:// stage (480x360, 8 stops, looping, as fast as it renders)."""
    dir_.mkdir(parents=True, exist_ok=True)
    prof = {
        "name": "test-daemon",
        "camera": camera or {"kind": "synth", "seed": 0, "width": 480, "height": 360, "fps": 30, "realtime": False,
                             "um_per_px": 1.0, "options": dict(SYNTH)},
        "engine": {"backend": "onnxruntime", "precision": "fp32", "device": "cpu", "threads": 1},
        "bundle": str(bundle),
        "pipeline": {"batch_size": 4, "preview_max_side": 480, "tile_overlap_px": 32, **(pipeline or {})},
        "storage": {"root": str(dir_ / "data"), "retention_days": 30, "disk_budget_mb": 500, "jpeg_quality": 85,
                    **(storage or {})},
        "server": {"bind": "127.0.0.1", "port": 8080, **(server or {})},   # tests pass port 0 (any free)
    }
    p = dir_ / name
    p.write_text(yaml.safe_dump(prof, sort_keys=False))
    return p


def wait_for(cond, timeout: float = 60.0, every: float = 0.1, what: str = "condition"):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class ServeProcess:
    """`cyto-edge serve` as a child process with JSON logs; the URL is read from its "listening" line."""

    def __init__(self, profile: Path, *args: str, env: dict | None = None):
        self.log_path = profile.parent / f"serve-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*CLI, "serve", "--profile", str(profile), "--log-format", "json", *args],
                                     stdout=subprocess.DEVNULL, stderr=self._log, env={**os.environ, **(env or {})})
        self.url = None

    def lines(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"raw": line})
        return out

    def wait_ready(self, timeout: float = 90.0) -> str:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            for e in self.lines():
                if e.get("msg") == "listening":
                    return e["url"]
            return None
        self.url = wait_for(ready, timeout, 0.05, "serve to listen")
        return self.url

    def kill(self, sig=signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(60)
        self._log.close()
        return rc


class MJPEGCamera:
    """An IP camera over HTTP (multipart JPEG) showing the synthetic stage; it can go down and come back."""

    def __init__(self, uri: str):
        from cyto_edge.runtime.sources import open_source

        self.src = open_source(uri)
        self.port, self.srv, self.sent = 0, None, 0

    def start(self) -> "MJPEGCamera":
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import cv2

        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while owner.srv is self.server:
                        f = owner.src.read()
                        ok, buf = cv2.imencode(".jpg", f.image)
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(buf) + buf.tobytes() + b"\r\n")
                        owner.sent += 1
                        time.sleep(0.03)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        srv = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        srv.daemon_threads = True
        srv.allow_reuse_address = True
        self.port, self.srv = srv.server_address[1], srv
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        srv, self.srv = self.srv, None
        if srv is not None:
            srv.shutdown()
            srv.server_close()
