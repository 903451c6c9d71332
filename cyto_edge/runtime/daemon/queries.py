"""The read side of the store for the pages, the JSON API and the exports.

Every function returns plain JSON-ready dicts. The slide summary is `grading.summarize_slide` over the
stored FOV grades (the same code the offline tools use), kept up to date one new FOV at a time.
"""
from __future__ import annotations

import csv
import io
import json
import threading

from cyto_edge import DISCLAIMER
from cyto_edge.runtime.grading import FovGrade, GradingPolicy, SlideAccumulator, SuspiciousDetection
from cyto_edge.runtime.taxonomy import BETHESDA_ORDER
from cyto_edge.runtime.daemon.store import Store

SESSION_COLS = ("id", "slide_id", "operator", "notes", "state", "started_utc", "ended_utc", "active_s", "restarts",
                "bundle_sha")
FOV_COLS = ("id", "session_id", "seq", "captured_utc", "t_session_s", "grade", "learned_grade", "suspicion", "focus",
            "relative_focus", "squamous_count", "n_detections", "width", "height", "image_state", "bundle_sha")
SUMMARY_CACHE = 4        # sessions whose parsed grades are kept
CSV_COLS = ("slide_id", "session", "seq", "fov_id", "captured_utc", "t_session_s", "grade", "learned_grade", "suspicion",
            "focus", "relative_focus", "squamous_count", "n_detections", *(f"n_{c}" for c in BETHESDA_ORDER[1:]),
            "organisms", "image_state", "bundle_sha", "cyto_edge")


def _loads(text):
    return json.loads(text) if text else None


def grade_from_dict(d: dict) -> FovGrade:
    return FovGrade(**{**d, "top": [SuspiciousDetection(**t) for t in d.get("top", [])]})


class Queries:
    def __init__(self, store: Store, policy: GradingPolicy | None = None):
        self.store, self.policy = store, policy or GradingPolicy()
        self._cache: dict[int, tuple] = {}   # sid -> (last FOV id, SlideAccumulator, summary)
        self._lock = threading.Lock()

    def set_policy(self, policy: GradingPolicy) -> None:
        with self._lock:
            self.policy = policy
            self._cache.clear()

    # -- sessions ---------------------------------------------------------------------------------------
    def sessions(self, limit: int = 50, offset: int = 0) -> list[dict]:
        rows = self.store.query(
            "SELECT s.*, (SELECT COUNT(*) FROM fovs f WHERE f.session_id = s.id) AS n_fovs, "
            "(SELECT MAX(suspicion) FROM fovs f WHERE f.session_id = s.id) AS max_suspicion "
            "FROM sessions s ORDER BY s.id DESC LIMIT ? OFFSET ?", (limit, offset))
        return [{**{k: r[k] for k in SESSION_COLS}, "n_fovs": r["n_fovs"], "max_suspicion": r["max_suspicion"]}
                for r in rows]

    def session(self, sid: int) -> dict | None:
        r = self.store.one("SELECT s.*, (SELECT COUNT(*) FROM fovs f WHERE f.session_id = s.id) AS n_fovs "
                           "FROM sessions s WHERE s.id = ?", (sid,))
        return None if r is None else {**{k: r[k] for k in SESSION_COLS}, "n_fovs": r["n_fovs"]}

    # -- FOVs ---------------------------------------------------------------------------------------------
    def fovs(self, sid: int, limit: int = 100, offset: int = 0, newest_first: bool = False) -> list[dict]:
        order = "DESC" if newest_first else "ASC"
        rows = self.store.query(f"SELECT {', '.join(FOV_COLS)}, grade_json FROM fovs WHERE session_id = ? "
                                f"ORDER BY seq {order} LIMIT ? OFFSET ?", (sid, limit, offset))
        return [self._fov_brief(r) for r in rows]

    @staticmethod
    def _fov_brief(r) -> dict:
        g = _loads(r["grade_json"]) or {}
        return {**{k: r[k] for k in FOV_COLS}, "organisms": g.get("organisms", {}),
                "category_counts": {k: v for k, v in g.get("category_counts", {}).items() if v}}

    def fov(self, fid: int) -> dict | None:
        r = self.store.one("SELECT * FROM fovs WHERE id = ?", (fid,))
        if r is None:
            return None
        out = {k: r[k] for k in FOV_COLS}
        for k, name in (("grade_json", "grade_detail"), ("detections_json", "detections"), ("quality_json", "quality"),
                        ("timings_json", "timings"), ("learned_json", "learned"), ("extra_json", "extra"),
                        ("source_json", "source"), ("versions", "versions")):
            out[name] = _loads(r[k])
        out["cells"] = self.cells_of(fid)
        return out

    def fov_image(self, fid: int) -> str | None:
        r = self.store.one("SELECT image_path FROM fovs WHERE id = ? AND image_state = 'stored'", (fid,))
        return r[0] if r else None

    def cells_of(self, fid: int) -> list[dict]:
        rows = self.store.query("SELECT id, rank, det_index, cls, category, score, weight, x0, y0, x1, y1, crop_state "
                                "FROM cells WHERE fov_id = ? ORDER BY rank", (fid,))
        return [dict(r) for r in rows]

    def crop(self, cid: int) -> str | None:
        r = self.store.one("SELECT crop_path FROM cells WHERE id = ? AND crop_state = 'stored'", (cid,))
        return r[0] if r else None

    # -- slide --------------------------------------------------------------------------------------------
    def summary(self, sid: int) -> dict | None:
        """`summarize_slide` over the session's FOV grades, kept up to date one new FOV at a time
        (grading.SlideAccumulator) for the few most recent sessions: a request costs only the FOVs stored
        since the last one, and memory does not grow with the length of a session."""
        if self.store.one("SELECT 1 FROM sessions WHERE id = ?", (sid,)) is None:
            return None
        with self._lock:
            last_id, acc, summ = self._cache.pop(sid, (0, None, None))
            acc = acc or SlideAccumulator(self.policy)
            rows = self.store.query("SELECT id, grade_json FROM fovs WHERE session_id = ? AND id > ? ORDER BY id",
                                    (sid, last_id))
            if rows or summ is None:
                for r in rows:
                    acc.add(r["id"], grade_from_dict(json.loads(r["grade_json"])))
                last_id = rows[-1]["id"] if rows else last_id
                summ = acc.summary().to_dict()
                summ.pop("fov_ids", None)
            self._cache[sid] = (last_id, acc, summ)         # re-inserted: the most recently used last
            while len(self._cache) > SUMMARY_CACHE:
                self._cache.pop(next(iter(self._cache)))
        return summ

    def gallery(self, sid: int, n: int = 24) -> list[dict]:
        """The session's most suspicious cells (severity weight x score), each with its FOV."""
        rows = self.store.query(
            "SELECT c.id, c.fov_id, f.seq AS fov_seq, c.cls, c.category, c.score, c.weight, c.x0, c.y0, c.x1, c.y1, "
            "c.crop_state, f.image_state FROM cells c JOIN fovs f ON f.id = c.fov_id WHERE c.session_id = ? "
            "ORDER BY c.weight DESC, c.id LIMIT ?", (sid, n))
        return [dict(r) for r in rows]

    # -- exports -----------------------------------------------------------------------------------------------
    def export_rows(self, sid: int) -> list[dict]:
        s = self.store.session(sid) or {}
        rows = self.store.query("SELECT * FROM fovs WHERE session_id = ? ORDER BY seq", (sid,))
        out = []
        for r in rows:
            g = json.loads(r["grade_json"])
            versions = _loads(r["versions"]) or {}
            cc = g.get("category_counts", {})
            out.append({"slide_id": s.get("slide_id"), "session": sid, "seq": r["seq"], "fov_id": r["id"],
                        "captured_utc": r["captured_utc"], "t_session_s": r["t_session_s"], "grade": r["grade"],
                        "learned_grade": r["learned_grade"], "suspicion": round(r["suspicion"], 4),
                        "focus": None if r["focus"] is None else round(r["focus"], 2),
                        "relative_focus": r["relative_focus"], "squamous_count": r["squamous_count"],
                        "n_detections": r["n_detections"], **{f"n_{c}": cc.get(c, 0) for c in BETHESDA_ORDER[1:]},
                        "organisms": ";".join(f"{k}:{v}" for k, v in g.get("organisms", {}).items()),
                        "image_state": r["image_state"], "bundle_sha": r["bundle_sha"],
                        "cyto_edge": versions.get("cyto_edge")})
        return out

    def export_csv(self, sid: int) -> str:
        buf = io.StringIO()
        buf.write(f"# {DISCLAIMER}\n")
        w = csv.DictWriter(buf, fieldnames=CSV_COLS, lineterminator="\n")
        w.writeheader()
        for row in self.export_rows(sid):
            w.writerow(row)
        return buf.getvalue()

    def export_json(self, sid: int) -> dict:
        return {"disclaimer": DISCLAIMER, "session": self.session(sid), "summary": self.summary(sid),
                "fovs": [self.fov(r["id"]) for r in self.store.query(
                    "SELECT id FROM fovs WHERE session_id = ? ORDER BY seq", (sid,))]}
