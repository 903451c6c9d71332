"""The results store: schema migrations, WAL, the lock, sessions, one transaction per FOV, crash sweep,
retention and the disk budget (real SQLite, real files; FOVs graded by the real grading code)."""
from __future__ import annotations

import datetime as dt
import sqlite3
import time

import numpy as np
import pytest

from cyto_edge.errors import BadInput
from cyto_edge.runtime.daemon.images import NAME_RE, crop_box
from cyto_edge.runtime.daemon.recorder import Recorder
from cyto_edge.runtime.daemon.retention import Housekeeper
from cyto_edge.runtime.daemon.store import MIGRATIONS, SCHEMA_VERSION, SessionConflict, Store, connect, migrate
from cyto_edge.runtime.decode import Detections
from cyto_edge.runtime.fov import FovEvent
from cyto_edge.runtime.grading import GradingPolicy, grade_fov
from cyto_edge.runtime.pipeline import FovResult
from cyto_edge.runtime.quality import analyze
from cyto_edge.runtime.sources import Frame
from cyto_edge.runtime.taxonomy import Taxonomy

TAX = Taxonomy.for_classes(["ascus", "hsil", "scc", "candida"])


def graded_fov(seed: int = 0, n: int = 6, size=(240, 320)):
    """A real FovEvent + FovResult: a noisy frame, random boxes, the rule-based grade."""
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 220, (*size, 3), dtype=np.uint8)
    xy = rng.uniform(0, min(size) - 40, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 40, (n, 2))], 1).astype(np.float32)   # (n, 4) xyxy px
    det = Detections(boxes, rng.uniform(0.3, 0.99, n).astype(np.float32), rng.integers(0, 4, n))
    q = analyze(img).quality
    g = grade_fov(det, TAX, GradingPolicy(score_threshold=0.5), squamous_count=17, focus=q.focus)
    frame = Frame(img, seed, time.monotonic(), {"stop_id": seed, "visit": 0})
    ev = FovEvent(frame, seed + 1, q, 0.97, "peak", 5)
    res = FovResult(det, g, None, None, q.to_dict(), 17, {"total": 12.5}, img.shape, seed, "ab" * 32)
    return ev, res


def record(store, hk, sid, seed=0, **kw):
    ev, res = graded_fov(seed, **kw)
    return Recorder(store, hk).record(sid, float(seed), ev, res, classes=TAX.classes, versions={"cyto_edge": "t"})


def test_migrations_from_empty_and_from_v1_keep_data(tmp_path):
    c = connect(tmp_path / "a.sqlite")
    assert migrate(c, target=1) == 0 and c.execute("PRAGMA user_version").fetchone()[0] == 1
    c.execute("INSERT INTO sessions (slide_id, state, started_utc) VALUES ('S', 'closed', 'x')")
    assert migrate(c) == 1
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == max(MIGRATIONS)
    assert c.execute("SELECT slide_id FROM sessions").fetchone()[0] == "S"
    assert c.execute("SELECT name FROM sqlite_master WHERE name = 'events'").fetchone()
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    c.close()
    (tmp_path / "results.sqlite").write_bytes((tmp_path / "a.sqlite").read_bytes())
    with pytest.raises(BadInput, match="newer cyto-edge"):
        Store.open(tmp_path)


def test_second_store_on_the_same_root_is_refused(tmp_path):
    s = Store.open(tmp_path)
    with pytest.raises(BadInput, match=r"in use by another `cyto-edge serve` \(pid \d+\)"):
        Store.open(tmp_path)
    s.close()
    Store.open(tmp_path).close()          # released on close


def test_sessions_one_open_at_a_time(tmp_path):
    s = Store.open(tmp_path)
    a = s.open_session("SLIDE-A", "op", "n")
    with pytest.raises(SessionConflict):
        s.open_session("SLIDE-B")
    with pytest.raises(sqlite3.IntegrityError):          # the schema itself allows one open session
        with s.transaction() as c:
            c.execute("INSERT INTO sessions (slide_id, state, started_utc) VALUES ('X', 'open', 'x')")
    closed = s.close_session(a["id"], 12.5)
    assert closed["state"] == "closed" and closed["active_s"] == 12.5 and closed["ended_utc"]
    with pytest.raises(SessionConflict):
        s.close_session(a["id"], 1.0)
    assert s.current_session() is None and s.open_session("SLIDE-B")["id"] == a["id"] + 1
    s.close()


def test_fov_images_before_row_and_one_transaction(tmp_path):
    s = Store.open(tmp_path)
    hk = Housekeeper(s, 30, 10 * 2**20)
    sid = s.open_session("S")["id"]
    r = record(s, hk, sid, 0)
    row = s.one("SELECT * FROM fovs WHERE id = ?", (r["id"],))
    assert row["image_state"] == "stored" and NAME_RE.match(row["image_path"]) and row["bundle_sha"] == "ab" * 32
    assert s.images.resolve(row["image_path"]).stat().st_size == row["image_bytes"] > 0
    cells = s.query("SELECT * FROM cells WHERE fov_id = ?", (r["id"],))
    assert len(cells) == len(graded_fov(0)[1].grade.top) > 0
    assert all(s.images.resolve(c["crop_path"]) for c in cells)
    assert s.one("SELECT active_s FROM sessions WHERE id = ?", (sid,))[0] == 0.0
    # a failing cell row rolls the whole FOV back: no row, and its images are removed
    n_files = sum(1 for _ in (tmp_path / "images").rglob("*.jpg"))
    with pytest.raises(sqlite3.IntegrityError):
        s.add_fov({"session_id": sid, "seq": 99, "captured_utc": "x", "t_session_s": 0, "grade": "NILM",
                   "suspicion": 0, "n_detections": 0, "image_state": "not_saved", "bundle_sha": "", "versions": {},
                   "grade_json": {}, "detections_json": {}}, [{"rank": 0, "det_index": 0, "cls": "x", "category": "x",
                                                               "score": 1, "weight": 1, "crop_state": "bogus"}])
    assert s.one("SELECT COUNT(*) FROM fovs WHERE seq = 99")[0] == 0
    assert sum(1 for _ in (tmp_path / "images").rglob("*.jpg")) == n_files
    assert s.integrity() == "ok"
    s.close()


def test_recover_removes_temp_files_and_files_no_row_names(tmp_path):
    s = Store.open(tmp_path)
    hk = Housekeeper(s, 30, 10 * 2**20)
    sid = s.open_session("S")["id"]
    record(s, hk, sid, 0)
    d = next((tmp_path / "images").iterdir())
    (d / ".f000002-abcdef.jpg.tmp").write_bytes(b"half")        # killed while writing
    (d / "f000002-abcdef.jpg").write_bytes(b"\xff\xd8 whole")      # killed before the commit
    keep = {p.name for p in d.iterdir()} - {".f000002-abcdef.jpg.tmp", "f000002-abcdef.jpg"}
    assert s.recover() == {"removed_temp": 1, "removed_orphans": 1}
    assert {p.name for p in d.iterdir()} == keep
    s.close()


def test_disk_budget_deletes_oldest_images_first_never_results(tmp_path):
    s = Store.open(tmp_path)
    hk = Housekeeper(s, None, 10 * 2**20)
    sid = s.open_session("S")["id"]
    ids = [record(s, hk, sid, i)["id"] for i in range(6)]
    per_fov = hk.stored_bytes / 6
    hk.budget = int(per_fov * 3.5)                 # room for three FOVs and a half
    ids.append(record(s, hk, sid, 6)["id"])
    rows = s.query("SELECT image_state, image_bytes FROM fovs ORDER BY id")
    states = [r[0] for r in rows]
    k = states.count("deleted")
    assert k >= 1 and states == ["deleted"] * k + ["stored"] * (7 - k), states      # oldest first
    assert hk.stored_bytes + rows[k - 1][1] > hk.budget          # no more deleted than needed
    assert s.one("SELECT COUNT(*) FROM fovs")[0] == 7           # every result kept
    assert hk.stored_bytes <= hk.budget
    assert hk.stored_bytes == sum(p.stat().st_size for p in (tmp_path / "images").rglob("*.jpg"))
    for r in s.query("SELECT image_path, image_state FROM fovs"):
        assert (s.images.resolve(r[0]) is not None) == (r[1] == "stored")
    # crops go only after every full image: a budget below one FOV's crops empties everything, then refuses
    hk.budget = 10
    assert not hk.make_room(0) or hk.stored_bytes == 0
    assert s.one("SELECT COUNT(*) FROM fovs WHERE image_state = 'stored'")[0] == 0
    r = record(s, hk, sid, 7)
    assert r["image_state"] == "not_saved"
    assert s.events(5)[0]["kind"] == "disk_budget"
    s.close()


def test_retention_by_days_ignores_an_unset_clock(tmp_path):
    s = Store.open(tmp_path)
    hk = Housekeeper(s, 30, 10 * 2**20)
    sid = s.open_session("S")["id"]
    a, b, c = (record(s, hk, sid, i)["id"] for i in range(3))
    with s.transaction() as cx:
        cx.execute("UPDATE fovs SET captured_utc = '2001-01-01T00:00:00' WHERE id = ?", (a,))  # clock not set
        cx.execute("UPDATE fovs SET captured_utc = ? WHERE id = ?",
                   ((dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=31)).isoformat(), b))
    assert hk.apply_retention() > 0
    st = dict(s.query("SELECT id, image_state FROM fovs"))
    assert st == {a: "stored", b: "deleted", c: "stored"}
    assert s.one("SELECT COUNT(*) FROM cells WHERE fov_id = ? AND crop_state = 'stored'", (b,))[0] == 0
    s.close()


def test_disk_full_keeps_results_and_alerts_then_recovers(tmp_path, monkeypatch):
    s = Store.open(tmp_path)
    hk = Housekeeper(s, None, 10 * 2**20)
    rec = Recorder(s, hk)
    sid = s.open_session("S")["id"]
    monkeypatch.setenv("CYTO_EDGE_MIN_FREE_MB", str(10**12))      # more than any disk: "full"
    ev, res = graded_fov(0)
    out = rec.record(sid, 0.0, ev, res, classes=TAX.classes, versions={})
    assert out["image_state"] == "not_saved" and rec.alert.kind == "disk_full"
    assert s.one("SELECT grade, n_detections FROM fovs WHERE id = ?", (out["id"],))[1] == len(res.detections)
    assert not any((tmp_path / "images").rglob("*.jpg"))
    monkeypatch.setenv("CYTO_EDGE_MIN_FREE_MB", "1")
    assert rec.record(sid, 1.0, *graded_fov(1), classes=TAX.classes, versions={})["image_state"] == "stored"
    assert rec.alert is None and [e["kind"] for e in s.events()] == ["alert_cleared", "disk_full"]
    s.close()


@pytest.mark.parametrize("rel", ["../results.sqlite", "s000001/../../serve.lock", "/etc/passwd", "s000001/x.jpg",
                                 "s000001/f000001-abcdef.jpg/../../serve.lock", "s1/f1-abcdef.jpg", "",
                                 "s000001/f000001-ABCDEF.jpg", "s000001\\f000001-abcdef.jpg"])
def test_image_names_outside_the_pattern_or_root_are_refused(tmp_path, rel):
    s = Store.open(tmp_path)
    assert s.images.resolve(rel) is None
    s.close()


def test_crop_box_adds_context_and_clips():
    assert crop_box((100, 200, 3), [10, 10, 30, 30]) == (4, 4, 36, 36)      # 20 px: the 32 px minimum
    assert crop_box((100, 200, 3), [10, 10, 70, 50]) == (0, 0, 85, 60)      # +25% each way, clipped at 0
    assert crop_box((100, 200, 3), [190, 90, 199, 99]) == (178, 78, 200, 100)   # min side 32, clipped
    assert crop_box((100, 200, 3), [float("nan"), 0, 1, 1]) is None
    assert crop_box((100, 200, 3), [500, 500, 600, 600]) is None
