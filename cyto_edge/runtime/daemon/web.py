"""The web app (FastAPI on uvicorn): pages, the MJPEG live stream, /healthz, /metrics and the JSON API.

    app = create_app(service, token)        # token None: no authentication (loopback only)

Pages: /  live view (MJPEG with boxes, grade, focus bar, FPS; session start/stop), /sessions, /sessions/{id}
(FOV list, slide summary, adequacy), /sessions/{id}/gallery (the most suspicious cells with their FOV),
/sessions/{id}/report (prints well), /fovs/{id} (the stored image with its boxes). Every page and report
carries "Research use only. Not for diagnostic use."
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path as FsPath

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.responses import StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from cyto_edge import DISCLAIMER, __version__
from cyto_edge.runtime.daemon import api, auth, metrics
from cyto_edge.runtime.daemon.logs import event, get_logger
from cyto_edge.runtime.daemon.middleware import AccessLog, BodyLimit
from cyto_edge.runtime.taxonomy import BETHESDA_ORDER

HERE = FsPath(__file__).resolve().parent
log = get_logger("web")
Id = api.Id


def create_app(svc, token: str | None = None) -> FastAPI:
    app = FastAPI(title="cyto-edge", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json", description=DISCLAIMER)
    app.state.svc, app.state.token = svc, token
    app.state.templates = _templates()
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(api.router)
    _pages(app)
    _errors(app)
    app.add_middleware(BodyLimit)
    app.add_middleware(auth.TokenAuth, token=token)
    app.add_middleware(AccessLog)
    return app


def _templates() -> Jinja2Templates:
    t = Jinja2Templates(directory=str(HERE / "templates"))
    t.env.globals.update(DISCLAIMER=DISCLAIMER, VERSION=__version__, ORDER=BETHESDA_ORDER)
    t.env.filters["dur"] = lambda s: "-" if s is None else f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}"
    t.env.filters["pct"] = lambda v: "-" if v is None else f"{100 * float(v):.0f}%"
    t.env.filters["num"] = lambda v, d=2: "-" if v is None else f"{float(v):.{d}f}"
    t.env.filters["gradecls"] = lambda g: "g-" + str(g or "none").lower().replace("-", "")
    return t


def _render(request: Request, name: str, **ctx) -> HTMLResponse:
    svc = request.app.state.svc
    ctx.update(alert=svc.recorder.alert, camera_state=svc.camera_state, engine_state=svc.engine_state,
               engine_error=svc.engine_error, auth=request.app.state.token is not None)
    return request.app.state.templates.TemplateResponse(request, name, ctx)


def _attention_cells(fov: dict) -> list[dict]:
    """The learned grader's cells of a stored FOV, most attended first, with the attention relative to the
    largest (for the overlay's opacity); [] when the bundle had no grader."""
    gc = (fov.get("extra") or {}).get("grader_cells") or {}
    pairs = list(zip(gc.get("boxes") or [], gc.get("attention") or []))
    top = max((a for _, a in pairs), default=0.0) or 1.0
    cells = [{"x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3], "attention": a, "rel": max(a / top, 0.15)}
             for b, a in pairs]
    return sorted(cells, key=lambda c: -c["attention"])


def _pages(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse)
    def live_page(request: Request):
        svc = request.app.state.svc
        return _render(request, "live.html", status=api.status(svc))

    @app.get("/sessions", response_class=HTMLResponse)
    def sessions_page(request: Request, offset: int = Query(0, ge=0, le=api.MAX_ID)):
        return _render(request, "sessions.html", sessions=request.app.state.svc.queries.sessions(100, offset))

    @app.get("/sessions/{sid}", response_class=HTMLResponse)
    def session_page(request: Request, sid: int = Id()):
        ctx = _session_ctx(request, sid)
        return _render(request, "session.html", **ctx, fovs=request.app.state.svc.queries.fovs(sid, 1000))

    @app.get("/sessions/{sid}/gallery", response_class=HTMLResponse)
    def gallery_page(request: Request, sid: int = Id(), n: int = Query(48, ge=1, le=500)):
        ctx = _session_ctx(request, sid)
        return _render(request, "gallery.html", **ctx, cells=request.app.state.svc.queries.gallery(sid, n))

    @app.get("/sessions/{sid}/report", response_class=HTMLResponse)
    def report_page(request: Request, sid: int = Id()):
        svc = request.app.state.svc
        ctx = _session_ctx(request, sid)
        return _render(request, "report.html", **ctx, fovs=svc.queries.fovs(sid, 1000),
                       cells=svc.queries.gallery(sid, 12), versions=svc.versions, now=time.strftime("%Y-%m-%d %H:%M"))

    @app.get("/fovs/{fid}", response_class=HTMLResponse)
    def fov_page(request: Request, fid: int = Id()):
        svc = request.app.state.svc
        f = svc.queries.fov(fid)
        if f is None:
            raise HTTPException(404, "no such FOV")
        return _render(request, "fov.html", fov=f, session=svc.queries.session(f["session_id"]),
                       attention=_attention_cells(f))

    @app.get("/images/{rel:path}")
    def image_file(request: Request, rel: str):
        p = request.app.state.svc.store.images.resolve(rel)
        if p is None:
            raise HTTPException(404, "no such image")
        return FileResponse(p, media_type="image/jpeg")

    @app.get("/stream.mjpg")
    async def stream(request: Request, fps: float = Query(10.0, gt=0, le=30)):
        return StreamingResponse(_mjpeg(request, request.app.state.svc, fps),
                                 media_type="multipart/x-mixed-replace; boundary=frame",
                                 headers={"Cache-Control": "no-store"})

    @app.get("/snapshot.jpg")
    def snapshot(request: Request):
        _, jpeg = request.app.state.svc.preview.jpeg()
        if not jpeg:
            raise HTTPException(503, "no frame yet")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.get("/healthz")
    def healthz(request: Request):
        svc = request.app.state.svc
        ok = svc.alive
        return JSONResponse({"ok": ok, "camera": svc.camera_state, "engine": svc.engine_state},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics_text(request: Request):
        return PlainTextResponse(metrics.render(request.app.state.svc), media_type=metrics.CONTENT_TYPE)

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = Query("/", max_length=2000)):
        return _render(request, "login.html", next=next, failed=False)

    @app.post("/login")
    async def login(request: Request):
        ok, nxt = auth.check_login(await request.body(), request.app.state.token)
        if not ok:
            return _render(request, "login.html", next=nxt, failed=True)
        resp = RedirectResponse(nxt, status_code=303)
        resp.headers.append("set-cookie", auth.set_cookie_header(auth.cookie_value(request.app.state.token)).decode())
        return resp


def _session_ctx(request: Request, sid: int) -> dict:
    q = request.app.state.svc.queries
    s = q.session(sid)
    if s is None:
        raise HTTPException(404, "no such session")
    return {"session": s, "summary": q.summary(sid)}


async def _mjpeg(request: Request, svc, fps: float):
    """multipart/x-mixed-replace parts, one per new preview image, at most `fps` per second."""
    last, period = -1, 1.0 / fps
    try:
        while not svc.stopping:
            if await request.is_disconnected():
                break
            t0 = time.monotonic()
            version, jpeg = svc.preview.version, None
            if version != last:
                version, jpeg = await asyncio.to_thread(svc.preview.jpeg)
            if jpeg and version != last:
                last = version
                yield (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: " + str(len(jpeg)).encode() +
                       b"\r\n\r\n" + jpeg + b"\r\n")
            await asyncio.sleep(max(0.01, period - (time.monotonic() - t0)))
    except asyncio.CancelledError:
        pass


def _errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        errs = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse({"detail": errs}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if "text/html" in request.headers.get("accept", "") and not request.url.path.startswith("/api/"):
            return _render(request, "error.html", code=exc.status_code, message=exc.detail)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        event(log, "internal error", level=40, path=request.url.path, error=f"{type(exc).__name__}: {exc}",
              exc_info=exc)
        return JSONResponse({"detail": "internal error"}, status_code=500)
