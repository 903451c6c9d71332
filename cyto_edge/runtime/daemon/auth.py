"""Access control: the API token, checked on every endpoint but /healthz.

The token comes from `server.token_file` (a file only the service can read) or `server.token_env` (an
environment variable), never from the profile itself. A bind outside loopback without a token is refused
at start-up; a token, once configured, is checked on loopback too. A request is let in by:
  - `Authorization: Bearer <token>`;
  - the cookie the login form (/login) sets, an HMAC of the token, HttpOnly and SameSite=Strict;
  - `?token=<token>` on a page, once: the cookie is set and the browser redirected to the same page
    without the token in its address.
Anything else gets 401 (JSON for the API and the stream) or a redirect to /login (pages).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode

from cyto_edge.errors import BadInput
from cyto_edge.runtime.daemon.logs import event, get_logger

log = get_logger("auth")
COOKIE = "cyto_edge_auth"
MIN_TOKEN_LEN = 16
PUBLIC = {"/healthz", "/login"}          # the login form carries its own style


def load_token(server, source: str = "profile") -> str | None:
    """The configured token (stripped), or None when neither token_file nor token_env is set."""
    if server.token_file is not None:
        p = Path(server.token_file)
        try:
            token = p.read_text().strip()
        except OSError as e:
            raise BadInput(f"{source}: server.token_file {p}: cannot read it ({e.strerror})") from None
        where = f"server.token_file {p}"
    elif server.token_env is not None:
        token = os.environ.get(server.token_env, "").strip()
        if not token:
            raise BadInput(f"{source}: server.token_env: the environment variable {server.token_env} is not set "
                           "or empty")
        where = f"server.token_env {server.token_env}"
    else:
        return None
    if len(token) < MIN_TOKEN_LEN:
        raise BadInput(f"{source}: {where}: the token must have at least {MIN_TOKEN_LEN} characters "
                       "(e.g. `openssl rand -hex 24`)")
    if server.token_file is not None and Path(server.token_file).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        event(log, "token file is readable by other users: chmod 600 it", level=30, file=str(server.token_file))
    return token


def cookie_value(token: str) -> str:
    return hmac.new(token.encode(), b"cyto-edge web session", hashlib.sha256).hexdigest()


class TokenAuth:
    """Pure ASGI middleware; `token=None` lets everything through (loopback without a token)."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token
        self.cookie = cookie_value(token) if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.token is None or scope["path"] in PUBLIC:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self._bearer_ok(headers) or self._cookie_ok(headers):
            return await self.app(scope, receive, send)
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        if "token" in query and hmac.compare_digest(query["token"].encode(), self.token.encode()):
            rest = urlencode({k: v for k, v in query.items() if k != "token"})
            return await _redirect(send, scope["path"] + (f"?{rest}" if rest else ""), set_cookie=self.cookie)
        if _wants_html(scope, headers):
            return await _redirect(send, "/login?next=" + quote(scope["path"], safe="/"))
        return await _json(send, 401, b'{"detail": "missing or wrong token: send Authorization: Bearer <token>"}',
                           [(b"www-authenticate", b'Bearer realm="cyto-edge"')])

    def _bearer_ok(self, headers: dict) -> bool:
        h = headers.get("authorization", "")
        if not h.lower().startswith("bearer "):
            return False
        return hmac.compare_digest(h[7:].strip().encode(), self.token.encode())

    def _cookie_ok(self, headers: dict) -> bool:
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), self.cookie.encode()):
                return True
        return False


def check_login(form_body: bytes, token: str | None) -> tuple[bool, str]:
    """(ok, next path) for a POSTed login form `token=...&next=...`."""
    form = dict(parse_qsl(form_body.decode("utf-8", "replace"), keep_blank_values=True))
    nxt = form.get("next") or "/"
    if not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
        nxt = "/"                                    # only local paths: no open redirect
    ok = token is not None and hmac.compare_digest(form.get("token", "").strip().encode(), token.encode())
    return ok, nxt


def set_cookie_header(value: str) -> bytes:
    return f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict".encode()


def _wants_html(scope, headers: dict) -> bool:
    path = scope["path"]
    if path.startswith("/api/") or path in ("/metrics", "/stream.mjpg", "/snapshot.jpg"):
        return False
    return scope.get("method") == "GET" and "text/html" in headers.get("accept", "")


async def _redirect(send, location: str, set_cookie: str | None = None):
    headers = [(b"location", location.encode("latin-1", "replace")), (b"content-length", b"0"),
               (b"cache-control", b"no-store")]
    if set_cookie:
        headers.append((b"set-cookie", set_cookie_header(set_cookie)))
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def _json(send, status: int, body: bytes, extra: list | None = None):
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
