"""The JSON API (everything the pages show, and the session and bundle controls).

    GET  /api/status                          camera, engine, disk, session, live figures, last FOV
    GET  /api/sessions?limit=&offset=         newest first
    POST /api/sessions                        {"slide_id", "operator"?, "notes"?} -> 201; 409 if one is open
    GET  /api/sessions/current                the open session (404 when none)
    POST /api/sessions/{id}/stop              -> 200; 409 when it is not the open session
    GET  /api/sessions/{id}                   the session and its slide summary (adequacy, worst grade...)
    GET  /api/sessions/{id}/fovs?limit=&offset=&order=asc|desc
    GET  /api/sessions/{id}/gallery?n=        most suspicious cells, each with its FOV
    GET  /api/sessions/{id}/export.csv | export.json
    GET  /api/fovs/{id}                       detections, grades, quality, timings, versions, cells
    GET  /api/fovs/{id}/image.jpg             the full-resolution JPEG
    GET  /api/cells/{id}/crop.jpg             a suspicious cell's crop
    GET  /api/events?limit=                   alerts and state changes, newest first
    GET  /api/bundle | POST /api/bundle {"path"}   the bundle in use | swap in a verified new one (422 if not)
Malformed input is a 4xx (422 for wrong types or values, 404 for unknown ids), never a 500.
"""
from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from cyto_edge import DISCLAIMER, __version__
from cyto_edge.runtime.daemon.service import BundleRefused
from cyto_edge.runtime.daemon.store import SessionConflict

MAX_ID = 2**62
router = APIRouter(prefix="/api")
def Id():
    """A positive database id in a path (a fresh Path per parameter: FastAPI binds it to one name)."""
    return Path(..., ge=1, le=MAX_ID)


def _clean(v: str) -> str:
    v = v.strip()
    if any(ord(ch) < 32 and ch not in "\n\t" or ord(ch) == 127 for ch in v):
        raise ValueError("must not contain control characters")
    return v


class SessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slide_id: StrictStr = Field(..., min_length=1, max_length=128)
    operator: StrictStr = Field("", max_length=128)
    notes: StrictStr = Field("", max_length=4000)

    @field_validator("slide_id", "operator", "notes")
    @classmethod
    def _text(cls, v: str, info) -> str:
        v = _clean(v)
        if info.field_name != "notes" and "\n" in v:
            raise ValueError("must be one line")
        if info.field_name == "slide_id" and not v:
            raise ValueError("must not be blank")
        return v


class BundleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: StrictStr = Field(..., min_length=1, max_length=4096)


def svc_of(request: Request):
    return request.app.state.svc


def _found(obj, what: str):
    if obj is None:
        raise HTTPException(404, f"no such {what}")
    return obj


def status(svc) -> dict:
    s = svc.runner_stats()
    st = svc.tracker.last
    alert = svc.recorder.alert
    sess = svc.session
    import shutil

    free = shutil.disk_usage(svc.store.root).free
    return {
        "version": __version__, "disclaimer": DISCLAIMER, "uptime_s": round(time.monotonic() - svc.started_mono, 1),
        "camera": {"state": svc.camera_state, "error": svc.camera_error, "kind": svc.profile.camera.kind,
                   "fps": (s.get("capture") or {}).get("fps")},
        "engine": {"state": svc.engine_state, "error": svc.engine_error,
                   "bundle_sha256": svc.pipeline.bundle_sha if svc.pipeline else None,
                   "engine": svc.versions.get("engine")},
        "disk": {"alert": None if alert is None else {"kind": alert.kind, "message": alert.message,
                                                       "since_utc": alert.since_utc},
                 "stored_mb": round(svc.hk.stored_bytes / 2**20, 2), "budget_mb": round(svc.hk.budget / 2**20, 1),
                 "free_mb": round(free / 2**20, 1)},
        "session": None if sess is None else {"id": sess["id"], "slide_id": sess["slide_id"],
                                              "operator": sess["operator"], "started_utc": sess["started_utc"],
                                              "active_s": round(svc.active_s(), 1)},
        "live": {"fps": svc.fps(), "latency_ms": s.get("latency_ms"), "fov_latency_ms": s.get("fov_latency_ms"),
                 "frames_dropped": svc.totals["frames_dropped"] + s.get("frames_dropped", 0),
                 "fovs_graded": svc.totals["fovs_graded"] + (s.get("fovs") or {}).get("graded", 0),
                 "fovs_stored": svc.recorder.stored},
        "tracker": None if st is None else {"state": st.state, "stop": st.stop, "relative_focus":
                                            round(float(st.relative_focus), 3), "moving": bool(st.moving)},
        "last_fov": svc.last_fov,
    }


@router.get("/status")
def get_status(request: Request):
    return status(svc_of(request))


@router.get("/sessions")
def list_sessions(request: Request, limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_ID)):
    return {"sessions": svc_of(request).queries.sessions(limit, offset)}


@router.post("/sessions", status_code=201)
def start_session(request: Request, body: SessionIn):
    try:
        return svc_of(request).start_session(body.slide_id, body.operator, body.notes)
    except SessionConflict as e:
        raise HTTPException(409, str(e)) from None


@router.get("/sessions/current")
def current_session(request: Request):
    svc = svc_of(request)
    s = svc.session
    return _found(None if s is None else svc.queries.session(s["id"]), "open session")


@router.post("/sessions/{sid}/stop")
def stop_session(request: Request, sid: int = Id()):
    svc = svc_of(request)
    _found(svc.queries.session(sid), "session")
    try:
        return svc.stop_session(sid)
    except SessionConflict as e:
        raise HTTPException(409, str(e)) from None


@router.get("/sessions/{sid}")
def get_session(request: Request, sid: int = Id()):
    q = svc_of(request).queries
    return {**_found(q.session(sid), "session"), "summary": q.summary(sid), "disclaimer": DISCLAIMER}


@router.get("/sessions/{sid}/fovs")
def session_fovs(request: Request, sid: int = Id(), limit: int = Query(100, ge=1, le=1000),
                 offset: int = Query(0, ge=0, le=MAX_ID), order: str = Query("asc", pattern="^(asc|desc)$")):
    q = svc_of(request).queries
    _found(q.session(sid), "session")
    return {"fovs": q.fovs(sid, limit, offset, newest_first=order == "desc")}


@router.get("/sessions/{sid}/gallery")
def session_gallery(request: Request, sid: int = Id(), n: int = Query(24, ge=1, le=500)):
    q = svc_of(request).queries
    _found(q.session(sid), "session")
    return {"cells": q.gallery(sid, n)}


@router.get("/sessions/{sid}/export.csv")
def export_csv(request: Request, sid: int = Id()):
    q = svc_of(request).queries
    _found(q.session(sid), "session")
    return Response(q.export_csv(sid), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="session-{sid}.csv"'})


@router.get("/sessions/{sid}/export.json")
def export_json(request: Request, sid: int = Id()):
    q = svc_of(request).queries
    _found(q.session(sid), "session")
    return JSONResponse(q.export_json(sid),
                        headers={"Content-Disposition": f'attachment; filename="session-{sid}.json"'})


@router.get("/fovs/{fid}")
def get_fov(request: Request, fid: int = Id()):
    return _found(svc_of(request).queries.fov(fid), "FOV")


@router.get("/fovs/{fid}/image.jpg")
def fov_image(request: Request, fid: int = Id()):
    svc = svc_of(request)
    return _image(svc, svc.queries.fov_image(fid), "FOV image")


@router.get("/cells/{cid}/crop.jpg")
def cell_crop(request: Request, cid: int = Id()):
    svc = svc_of(request)
    return _image(svc, svc.queries.crop(cid), "cell crop")


def _image(svc, rel: str | None, what: str):
    path = None if rel is None else svc.store.images.resolve(rel)
    _found(path, what + " (never saved, or deleted by retention)")
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@router.get("/events")
def events(request: Request, limit: int = Query(50, ge=1, le=1000)):
    return {"events": svc_of(request).store.events(limit)}


@router.get("/bundle")
def get_bundle(request: Request):
    return svc_of(request).bundle_info()


@router.post("/bundle")
def swap_bundle(request: Request, body: BundleIn):
    try:
        return svc_of(request).swap_bundle(body.path)
    except BundleRefused as e:
        raise HTTPException(422, f"bundle refused, the running one is kept: {e}") from None
