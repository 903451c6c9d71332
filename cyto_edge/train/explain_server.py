"""The explain service (`cyto-edge explain --serve`): stdlib HTTP, one checkpoint, one explanation at a
time (a lock; health checks stay answered while one runs). Protocol: cyto_edge/explain_service.py."""
from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cyto_edge.errors import BadInput, CytoError
from cyto_edge.explain_service import HEADER, MAX_STEPS, MAX_UPLOAD_BYTES, parse_box
from cyto_edge.train.explain import BASELINES, METHODS, decode_rgb, encode_png
from cyto_edge.train.explain_targets import Explainer


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _options(query: str) -> dict:
    q = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
    unknown = set(q) - {"box", "class", "baseline", "steps", "method", "format"}
    if unknown:
        raise BadInput(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    baseline, method = q.get("baseline", "black"), q.get("method", "trapezoid")
    if baseline not in BASELINES:
        raise BadInput(f"baseline must be one of {', '.join(BASELINES)}")
    if method not in METHODS:
        raise BadInput(f"method must be one of {', '.join(METHODS)}")
    try:
        steps = int(q.get("steps", "50"))
    except ValueError:
        raise BadInput("steps must be an integer") from None
    if not 1 <= steps <= MAX_STEPS:
        raise BadInput(f"steps must be in [1, {MAX_STEPS}]")
    return {"box": parse_box(q.get("box")), "class_name": q.get("class") or None, "baseline": baseline,
            "steps": steps, "method": method, "format": q.get("format", "json")}


def make_server(explainer: Explainer, host: str = "127.0.0.1", port: int = 8765,
                token: str | None = None) -> ThreadingHTTPServer:
    """A ready server (call serve_forever()); port 0 picks a free port (server.server_address)."""
    if not is_loopback(host) and not token:
        raise BadInput(f"--host {host} is not loopback: give --token (or set CYTO_EDGE_EXPLAIN_TOKEN)")
    lock = threading.Lock()
    health = {"ok": True, "kind": explainer.kind, "arch": explainer.arch, "checkpoint": explainer.path.name,
              "classes": explainer.classes, "max_steps": MAX_STEPS}

    class Handler(BaseHTTPRequestHandler):
        server_version = "cyto-edge-explain"

        def log_message(self, fmt, *args):  # one line per request on stderr
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

        def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict):
            self._send(status, json.dumps(obj, default=str).encode(), "application/json")

        def do_GET(self):
            path = urllib.parse.urlsplit(self.path).path
            if path == "/healthz":
                return self._json(200, health)
            self._json(404, {"error": f"no such endpoint {path}; use GET /healthz or POST /explain"})

        def do_POST(self):
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/explain":
                return self._json(404, {"error": f"no such endpoint {url.path}; use POST /explain"})
            if token and not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {token}"):
                return self._json(401, {"error": "missing or wrong bearer token"})
            n = int(self.headers.get("Content-Length") or 0)
            if n <= 0:
                return self._json(400, {"error": "send the crop's PNG/JPEG bytes as the request body"})
            if n > MAX_UPLOAD_BYTES:
                return self._json(413, {"error": f"upload of {n} bytes exceeds {MAX_UPLOAD_BYTES}"})
            data = self.rfile.read(n)
            try:
                opts = _options(url.query)
                fmt = opts.pop("format")
                rgb = decode_rgb(data)
                with lock:
                    ex = explainer.explain(rgb, **opts)
            except CytoError as e:
                return self._json(400, {"error": str(e)})
            except Exception as e:  # noqa: BLE001 - the service answers, the client gets the reason
                return self._json(500, {"error": f"explanation failed ({type(e).__name__}: {str(e)[:200]})"})
            info = {**ex.to_json(), "image_size": [rgb.shape[1], rgb.shape[0]]}
            png = encode_png(ex.overlay)
            self.server.explained += 1  # type: ignore[attr-defined]
            if fmt == "png":
                return self._send(200, png, "image/png", {HEADER: json.dumps(info, default=str)})
            self._json(200, {**info, "overlay_png_base64": base64.b64encode(png).decode()})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.explained = 0  # type: ignore[attr-defined]
    return server
