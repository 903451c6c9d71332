"""Two pure ASGI middlewares: the access log (path only, never the query string) and a body size limit."""
from __future__ import annotations

import logging
import time

from cyto_edge.runtime.daemon.logs import event, get_logger

log = get_logger("http")
MAX_BODY = 64 * 1024          # bytes; the API takes small JSON documents only


class AccessLog:
    """One line per request: method, path, status, ms. GETs that succeed at debug level (the live page
    polls), everything else at info, server errors at error."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            code = status[0]
            level = logging.ERROR if code >= 500 else logging.DEBUG if scope["method"] == "GET" and code < 400 \
                else logging.INFO
            event(log, "request", level=level, method=scope["method"], path=scope["path"][:200], status=code,
                  ms=round((time.perf_counter() - t0) * 1e3, 1))


class BodyLimit:
    """413 for a request body larger than MAX_BODY (by Content-Length, or counted as it arrives)."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.limit
                except ValueError:
                    too_big = True
                if too_big:
                    return await _too_large(send, self.limit)
        seen, started = [0], [False]

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.limit:
                    raise _TooLarge()
            return message

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        try:
            await self.app(scope, counted, send_wrapper)
        except _TooLarge:
            if not started[0]:
                await _too_large(send, self.limit)


class _TooLarge(Exception):
    pass


async def _too_large(send, limit: int):
    body = f'{{"detail": "request body larger than {limit} bytes"}}'.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
