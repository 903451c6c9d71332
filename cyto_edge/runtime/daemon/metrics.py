"""Prometheus text exposition (format 0.0.4) of the service's figures, written by hand: no dependency.

Gauges: fps, capture-to-overlay latency and FOV latency quantiles (seconds), camera and engine state
(one series per state, 1 for the current one), disk alert, stored image bytes, open session. Counters:
frames, dropped frames, FOVs graded / stored / dropped / stored without images, engine errors.
"""
from __future__ import annotations

import time

from cyto_edge import __version__

CAMERA_STATES = ("connecting", "live", "lost", "ended")
ENGINE_STATES = ("loading", "ok", "degraded", "error")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _esc(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Out:
    def __init__(self):
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str, samples) -> None:
        """samples: a number, or a list of (labels dict, number)."""
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for labels, value in (samples if isinstance(samples, list) else [({}, samples)]):
            if value is None:
                continue
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{lab}}} {float(value):.6g}" if lab else f"{name} {float(value):.6g}")


def render(svc) -> str:
    s = svc.runner_stats()
    tot = svc.totals
    fovs = s.get("fovs", {})
    o = _Out()
    o.metric("cyto_edge_up", "gauge", "1 while the service runs", 1)
    o.metric("cyto_edge_build_info", "gauge", "version and bundle", [({"version": __version__, "bundle_sha256":
                                                                          (svc.pipeline.bundle_sha[:16] if svc.pipeline
                                                                           else "")}, 1)])
    o.metric("cyto_edge_uptime_seconds", "gauge", "seconds since start (monotonic)", time.monotonic() - svc.started_mono)
    o.metric("cyto_edge_fps", "gauge", "frames processed per second by the live pipeline (last 2 s)", svc.fps())
    cap = (s.get("capture") or {}).get("fps")
    o.metric("cyto_edge_camera_fps", "gauge", "frames per second delivered by the camera", cap)
    lat = s.get("latency_ms") or {}
    o.metric("cyto_edge_latency_seconds", "gauge", "capture to overlay latency (quantiles over the last frames)",
             [({"quantile": q}, None if lat.get(k) is None else lat[k] / 1e3) for q, k in (("0.5", "p50"), ("0.95", "p95"))])
    fl = s.get("fov_latency_ms") or {}
    o.metric("cyto_edge_fov_latency_seconds", "gauge", "capture to graded FOV latency",
             [({"quantile": q}, None if fl.get(k) is None else fl[k] / 1e3) for q, k in (("0.5", "p50"), ("0.95", "p95"))])
    o.metric("cyto_edge_frames_total", "counter", "frames processed", tot["frames"] + s.get("frames", 0))
    o.metric("cyto_edge_frames_dropped_total", "counter", "camera frames not processed (newest-frame policy)",
             tot["frames_dropped"] + s.get("frames_dropped", 0))
    o.metric("cyto_edge_fovs_graded_total", "counter", "fields of view graded", tot["fovs_graded"] + fovs.get("graded", 0))
    o.metric("cyto_edge_fovs_dropped_total", "counter", "FOVs dropped because grading fell behind",
             tot["fovs_dropped"] + fovs.get("dropped", 0))
    o.metric("cyto_edge_fovs_stored_total", "counter", "FOVs committed to the store", svc.recorder.stored)
    o.metric("cyto_edge_fovs_without_images_total", "counter", "FOVs stored without images (disk full or budget)",
             svc.recorder.images_skipped)
    o.metric("cyto_edge_fovs_unsaved_total", "counter", "FOVs graded while no session was open", svc.fovs_unsaved)
    o.metric("cyto_edge_engine_errors_total", "counter", "failed inferences",
             tot["engine_errors"] + fovs.get("engine_errors", 0))
    o.metric("cyto_edge_store_errors_total", "counter", "FOVs that could not be stored", svc.store_errors)
    o.metric("cyto_edge_camera_state", "gauge", "camera state (1 = current)",
             [({"state": st}, int(svc.camera_state == st)) for st in CAMERA_STATES])
    o.metric("cyto_edge_engine_state", "gauge", "engine state (1 = current)",
             [({"state": st}, int(svc.engine_state == st)) for st in ENGINE_STATES])
    alert = svc.recorder.alert
    o.metric("cyto_edge_disk_alert", "gauge", "1 while images cannot be saved (disk full or budget)",
             [({"kind": alert.kind if alert else "none"}, int(alert is not None))])
    o.metric("cyto_edge_stored_image_bytes", "gauge", "bytes of stored images", svc.hk.stored_bytes)
    o.metric("cyto_edge_disk_budget_bytes", "gauge", "storage.disk_budget_mb in bytes", svc.hk.budget)
    o.metric("cyto_edge_session_open", "gauge", "1 while a slide session is open", int(svc.session is not None))
    return "\n".join(o.lines) + "\n"
