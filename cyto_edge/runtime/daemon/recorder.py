"""One graded FOV -> its images on disk, then its row and its cells' rows in one transaction.

Order (the store's invariant): JPEG of the full frame and crops of the suspicious cells are written and
fsynced, then the row naming them is committed. When the images cannot be written (disk below its free
reserve, ENOSPC, or more than the whole disk budget) the FOV is still stored, with `image_state =
'not_saved'`, and a disk alert is raised; the alert clears by itself once images fit again.
"""
from __future__ import annotations

import functools
import platform
import sqlite3
import time
from dataclasses import dataclass

import numpy as np

from cyto_edge.runtime.daemon.images import DiskFull, crop_box, encode_jpeg
from cyto_edge.runtime.daemon.logs import event as log_event
from cyto_edge.runtime.daemon.logs import get_logger
from cyto_edge.runtime.daemon.retention import Housekeeper
from cyto_edge.runtime.daemon.store import Store, utc_now

log = get_logger("recorder")


@functools.lru_cache(maxsize=1)
def boot_id() -> str:
    """This boot's id (monotonic times compare only within one boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def software_versions(engine_name: str = "", precision: str = "") -> dict:
    """What produced a result: cyto-edge, the engine library, OpenCV, numpy, Python."""
    from importlib import metadata

    import cv2

    from cyto_edge import __version__

    out = {"cyto_edge": __version__, "opencv": cv2.__version__, "numpy": np.__version__,
           "python": platform.python_version(), "engine": f"{engine_name} {precision}".strip()}
    for dist in ("onnxruntime", "openvino", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def jsonable(v):
    """numpy arrays and scalars inside dicts / lists -> plain Python."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


@dataclass
class Alert:
    kind: str          # disk_full | disk_budget | image_error
    message: str
    since_utc: str


class Recorder:
    def __init__(self, store: Store, housekeeper: Housekeeper, *, jpeg_quality: int = 90):
        self.store, self.hk, self.quality = store, housekeeper, int(jpeg_quality)
        self.alert: Alert | None = None
        self.stored = 0
        self.images_skipped = 0

    def record(self, session_id: int, t_session_s: float, ev, result, *, classes: list[str],
               versions: dict) -> dict:
        """Store one FOV (FovEvent `ev`, FovResult `result`); returns {id, seq, grade, image_state}."""
        t0 = time.perf_counter()
        seq = self.store.next_seq(session_id)
        img = ev.frame.image                                   # (H, W, 3) uint8 BGR, full resolution
        top = list(result.grade.top)
        boxes = [crop_box(img.shape, d.box) for d in top]
        files, full_name, crop_names = self._encode(session_id, seq, img, boxes)
        written = self._write(files, session_id)
        nbytes = {rel: len(data) for rel, data in files} if written else {}
        fov = self._fov_row(session_id, seq, t_session_s, ev, result, classes, versions,
                            full_name if written else None, nbytes.get(full_name, 0))
        cells = [self._cell_row(rank, d, crop_names[rank] if written and boxes[rank] else None,
                                nbytes.get(crop_names[rank], 0)) for rank, d in enumerate(top)]
        try:
            fid = self.store.add_fov(fov, cells, active_s=t_session_s)
        except BaseException as e:
            if written:   # no row names them: remove now rather than at the next start
                self.store.images.delete([rel for rel, _ in files])
            if isinstance(e, sqlite3.OperationalError) and "full" in str(e).lower():
                self.alert = Alert("disk_full", "disk full: results cannot be stored", utc_now())   # no room for an event row
            raise
        if written:
            self.hk.added(sum(nbytes.values()))
        else:
            self.images_skipped += 1
        self.stored += 1
        log_event(log, "fov stored", session=session_id, fov=fid, seq=seq, grade=result.grade.grade,
                  images=fov["image_state"], ms=round((time.perf_counter() - t0) * 1e3, 1))
        return {"id": fid, "seq": seq, "grade": result.grade.grade, "image_state": fov["image_state"]}

    # -- images -----------------------------------------------------------------------------------------------
    def _encode(self, session_id: int, seq: int, img: np.ndarray, boxes: list) -> tuple[list, str, list]:
        full_name, crop_names = self.store.images.new_names(session_id, seq, len(boxes))
        files = [(full_name, encode_jpeg(img, self.quality))]
        for name, b in zip(crop_names, boxes):
            if b is not None:
                x0, y0, x1, y1 = b
                files.append((name, encode_jpeg(np.ascontiguousarray(img[y0:y1, x0:x1]), self.quality)))
        return files, full_name, crop_names

    def _write(self, files: list[tuple[str, bytes]], session_id: int) -> bool:
        total = sum(len(d) for _, d in files)
        if not self.hk.make_room(total):
            self._raise_alert("disk_budget", f"storage.disk_budget_mb ({self.hk.budget // 2**20} MB) cannot hold "
                                             f"one FOV's images ({total // 1024} KB): results only", session_id)
            return False
        try:
            self.store.images.write_all(files)
        except DiskFull as e:
            self._raise_alert("disk_full", f"disk full: {e.strerror}; results are kept, images are not saved",
                              session_id)
            return False
        except OSError as e:
            self._raise_alert("image_error", f"images not saved: {e.strerror or e}", session_id)
            return False
        if self.alert is not None:
            log_event(log, "images saved again", alert=self.alert.kind)
            self.store.add_event("alert_cleared", f"{self.alert.kind}: images are saved again", session_id)
            self.alert = None
        return True

    def _raise_alert(self, kind: str, message: str, session_id: int) -> None:
        if self.alert is None or self.alert.kind != kind:
            self.alert = Alert(kind, message, utc_now())
            self.store.add_event(kind, message, session_id)
            log_event(log, "alert: " + message, level=30, alert=kind)

    # -- rows ---------------------------------------------------------------------------------------------------
    def _fov_row(self, session_id, seq, t_session_s, ev, result, classes, versions, image_path, image_bytes) -> dict:
        g, det, q = result.grade, result.detections, result.quality or {}
        frame = ev.frame
        wall = time.time() - (time.monotonic() - frame.timestamp)
        learned = result.learned_grade or None
        extra = {k: v for k, v in (("classified", result.classified), ("warnings", result.warnings or None),
                                   ("grader_cells", _grader_cells(result))) if v is not None}
        return {
            "session_id": session_id, "seq": seq, "captured_utc": _iso(wall), "t_session_s": round(t_session_s, 3),
            "boot_id": boot_id(), "captured_mono": round(frame.timestamp, 4), "grade": g.grade,
            "suspicion": float(g.suspicion), "learned_grade": (learned or {}).get("grade"),
            "focus": q.get("focus"), "relative_focus": float(ev.relative_focus), "squamous_count": result.squamous_count,
            "n_detections": int(len(det)), "width": int(frame.image.shape[1]), "height": int(frame.image.shape[0]),
            "image_path": image_path, "image_bytes": int(image_bytes),
            "image_state": "stored" if image_path else "not_saved", "bundle_sha": result.bundle_sha,
            "versions": versions, "grade_json": jsonable(g.to_dict()),
            "detections_json": {"boxes": np.round(np.asarray(det.boxes, np.float64), 1).tolist(),
                                "scores": np.round(np.asarray(det.scores, np.float64), 4).tolist(),
                                "labels": [classes[int(i)] for i in det.labels]},
            "quality_json": jsonable(q), "timings_json": jsonable(result.timings),
            "learned_json": jsonable(learned) if learned else None, "extra_json": jsonable(extra) if extra else None,
            "source_json": jsonable({"frame_index": frame.index, "meta": frame.meta, "stop": ev.stop,
                                     "reason": ev.reason, "waited_frames": ev.waited_frames}),
        }

    @staticmethod
    def _cell_row(rank: int, d, crop_path: str | None, crop_bytes: int) -> dict:
        x0, y0, x1, y1 = (float(v) for v in d.box)
        return {"rank": rank, "det_index": int(d.index), "cls": d.cls, "category": d.category, "score": float(d.score),
                "weight": float(d.weight), "x0": x0, "y0": y0, "x1": x1, "y1": y1, "crop_path": crop_path,
                "crop_bytes": int(crop_bytes), "crop_state": "stored" if crop_path else "not_saved"}


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds")


def _grader_cells(result) -> dict | None:
    """The learned grader's cells (frame px boxes, raster order) with the cross-attention it paid each."""
    if result.cell_attention is None or result.cell_boxes is None:
        return None
    return {"boxes": np.round(np.asarray(result.cell_boxes, np.float64), 1).tolist(),
            "attention": np.round(np.asarray(result.cell_attention, np.float64), 5).tolist()}
