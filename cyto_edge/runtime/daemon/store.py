"""The results store: SQLite in WAL mode under `<storage.root>/`, with the images beside it (images.py).

    store = Store.open(root)          # takes the lock, migrates the schema, removes crash leftovers
    s = store.open_session("S-1", operator="", notes="", bundle_sha=...)
    store.add_fov(fov_row, cell_rows) # ONE transaction per FOV, after its images are on disk
    store.close()

Files: `results.sqlite` (+ -wal, -shm), `images/`, `serve.lock`. Durability: WAL with synchronous=FULL,
so a committed FOV survives a power cut; images are fsynced before the row naming them is committed, so
no row ever names a missing file. A second `cyto-edge serve` on the same root is refused: `serve.lock`
is held with fcntl.flock for the life of the process (the OS releases it when the process dies, kill -9
included). Schema: versioned with PRAGMA user_version; `MIGRATIONS[n]` takes a database from n-1 to n,
each in its own transaction; a database from a newer cyto-edge is refused.

Times: `captured_utc` / `started_utc` are wall-clock (ISO 8601, UTC) for people; durations (`active_s`
of a session, `t_session_s` of a FOV) come from the monotonic clock, since a Raspberry Pi has no RTC
and its wall clock may jump when NTP first answers. Results are never deleted; only images are
(retention.py).
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import sqlite3
import threading
from pathlib import Path

from cyto_edge.errors import BadInput
from cyto_edge.runtime.daemon.images import ImageStore

DB_NAME = "results.sqlite"
LOCK_NAME = "serve.lock"

MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE sessions (
            id INTEGER PRIMARY KEY, slide_id TEXT NOT NULL, operator TEXT NOT NULL DEFAULT '',
            notes TEXT NOT NULL DEFAULT '', state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
            started_utc TEXT NOT NULL, ended_utc TEXT, active_s REAL NOT NULL DEFAULT 0,
            restarts INTEGER NOT NULL DEFAULT 0, bundle_sha TEXT, profile TEXT)""",
        "CREATE UNIQUE INDEX sessions_one_open ON sessions(state) WHERE state = 'open'",
        """CREATE TABLE fovs (
            id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL REFERENCES sessions(id), seq INTEGER NOT NULL,
            captured_utc TEXT NOT NULL, t_session_s REAL NOT NULL, boot_id TEXT, captured_mono REAL,
            grade TEXT NOT NULL, suspicion REAL NOT NULL, learned_grade TEXT, focus REAL, relative_focus REAL,
            squamous_count INTEGER, n_detections INTEGER NOT NULL, width INTEGER, height INTEGER,
            image_path TEXT, image_bytes INTEGER NOT NULL DEFAULT 0,
            image_state TEXT NOT NULL CHECK (image_state IN ('stored', 'deleted', 'not_saved')),
            bundle_sha TEXT NOT NULL, versions TEXT NOT NULL, grade_json TEXT NOT NULL,
            detections_json TEXT NOT NULL, quality_json TEXT, timings_json TEXT, learned_json TEXT,
            extra_json TEXT, source_json TEXT, UNIQUE (session_id, seq))""",
        """CREATE TABLE cells (
            id INTEGER PRIMARY KEY, fov_id INTEGER NOT NULL REFERENCES fovs(id),
            session_id INTEGER NOT NULL REFERENCES sessions(id), rank INTEGER NOT NULL,
            det_index INTEGER NOT NULL, cls TEXT NOT NULL, category TEXT NOT NULL, score REAL NOT NULL,
            weight REAL NOT NULL, x0 REAL, y0 REAL, x1 REAL, y1 REAL, crop_path TEXT,
            crop_bytes INTEGER NOT NULL DEFAULT 0,
            crop_state TEXT NOT NULL CHECK (crop_state IN ('stored', 'deleted', 'not_saved')))""",
        "CREATE INDEX cells_session_weight ON cells(session_id, weight DESC)",
        "CREATE INDEX cells_fov ON cells(fov_id)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ],
    2: [  # alerts, and the indexes retention walks oldest-first
        """CREATE TABLE events (id INTEGER PRIMARY KEY, utc TEXT NOT NULL, kind TEXT NOT NULL,
            message TEXT NOT NULL, session_id INTEGER)""",
        "CREATE INDEX fovs_image_state ON fovs(image_state, id)",
        "CREATE INDEX cells_crop_state ON cells(crop_state, id)",
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (explicit BEGIN/COMMIT), WAL, synchronous=FULL, foreign keys."""
    c = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
    c.row_factory = sqlite3.Row
    c.execute("PRAGMA busy_timeout = 10000")
    c.execute("PRAGMA journal_mode = WAL")
    c.execute("PRAGMA synchronous = FULL")
    c.execute("PRAGMA foreign_keys = ON")
    return c


def migrate(c: sqlite3.Connection, target: int = SCHEMA_VERSION, source: str = "store") -> int:
    """Apply MIGRATIONS up to `target`, one transaction each; returns the version before."""
    before = c.execute("PRAGMA user_version").fetchone()[0]
    if before > SCHEMA_VERSION:
        raise BadInput(f"{source}: schema version {before} was written by a newer cyto-edge (this one reads up to "
                       f"{SCHEMA_VERSION}); upgrade cyto-edge or use another storage.root")
    for v in range(before + 1, target + 1):
        c.execute("BEGIN IMMEDIATE")
        try:
            for stmt in MIGRATIONS[v]:
                c.execute(stmt)
            c.execute(f"PRAGMA user_version = {v}")
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
    return before


class StoreLock:
    """An exclusive fcntl lock on `<root>/serve.lock`, held until release() or process exit."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise BadInput(f"{root}: the store is in use by another `cyto-edge serve` (pid {other}); stop it or "
                           "set another storage.root") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


class Store:
    def __init__(self, root: Path, lock: StoreLock | None):
        self.root = Path(root)
        self.db_path = self.root / DB_NAME
        self.images = ImageStore(self.root / "images")
        self._lock = lock
        self._w = connect(self.db_path)            # the one writing connection, behind _wlock
        self._wlock = threading.RLock()
        self._local = threading.local()             # one reading connection per thread
        self._readers: list[sqlite3.Connection] = []
        self._rlock = threading.Lock()
        self.closed = False
        self.migrated_from = migrate(self._w, source=str(self.db_path))

    @classmethod
    def open(cls, root: str | Path, *, lock: bool = True) -> "Store":
        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInput(f"storage.root {root}: cannot create it ({e.strerror})") from None
        if not os.access(root, os.W_OK):
            raise BadInput(f"storage.root {root}: not writable by this user")
        held = StoreLock(root) if lock else None
        try:
            return cls(root, held)
        except sqlite3.DatabaseError as e:
            if held:
                held.release()
            raise BadInput(f"{root / DB_NAME}: not a usable SQLite database ({e})") from None

    # -- connections ----------------------------------------------------------------------------------
    def reader(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = connect(self.db_path)
            c.execute("PRAGMA query_only = ON")
            c.execute("PRAGMA cache_size = -1024")          # 1 MB per reading thread (the web threadpool)
            self._local.conn = c
            with self._rlock:
                self._readers.append(c)
        return c

    def query(self, sql: str, args=()) -> list[sqlite3.Row]:
        return self.reader().execute(sql, args).fetchall()

    def one(self, sql: str, args=()) -> sqlite3.Row | None:
        return self.reader().execute(sql, args).fetchone()

    def transaction(self):
        return _Tx(self)

    # -- sessions -------------------------------------------------------------------------------------
    def open_session(self, slide_id: str, operator: str = "", notes: str = "", bundle_sha: str = "",
                     profile: str = "") -> dict:
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM sessions WHERE state = 'open'").fetchone():
                raise SessionConflict("a session is already open: stop it first")
            cur = c.execute("INSERT INTO sessions (slide_id, operator, notes, state, started_utc, bundle_sha, profile) "
                            "VALUES (?, ?, ?, 'open', ?, ?, ?)", (slide_id, operator, notes, utc_now(), bundle_sha,
                                                                    profile))
            sid = cur.lastrowid
        return self.session(sid)

    def close_session(self, session_id: int, active_s: float) -> dict:
        with self.transaction() as c:
            row = c.execute("SELECT state FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                raise KeyError(session_id)
            if row["state"] != "open":
                raise SessionConflict(f"session {session_id} is already closed")
            c.execute("UPDATE sessions SET state = 'closed', ended_utc = ?, active_s = ? WHERE id = ?",
                      (utc_now(), float(active_s), session_id))
        return self.session(session_id)

    def mark_resumed(self, session_id: int) -> None:
        with self.transaction() as c:
            c.execute("UPDATE sessions SET restarts = restarts + 1 WHERE id = ?", (session_id,))

    def update_active(self, session_id: int, active_s: float) -> None:
        with self.transaction() as c:
            c.execute("UPDATE sessions SET active_s = ? WHERE id = ? AND state = 'open'", (float(active_s), session_id))

    def session(self, session_id: int) -> dict | None:
        row = self.one("SELECT * FROM sessions WHERE id = ?", (session_id,))
        return dict(row) if row else None

    def current_session(self) -> dict | None:
        row = self.one("SELECT * FROM sessions WHERE state = 'open'")
        return dict(row) if row else None

    # -- FOVs -----------------------------------------------------------------------------------------
    def next_seq(self, session_id: int) -> int:
        with self._wlock:
            row = self._w.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM fovs WHERE session_id = ?",
                                  (session_id,)).fetchone()
        return int(row[0])

    def add_fov(self, fov: dict, cells: list[dict], active_s: float | None = None) -> int:
        """Insert one FOV row and its cell rows in ONE transaction (images already durable); returns its id."""
        with self.transaction() as c:
            cols = ", ".join(fov)
            cur = c.execute(f"INSERT INTO fovs ({cols}) VALUES ({', '.join('?' * len(fov))})",
                            [_sql(v) for v in fov.values()])
            fid = cur.lastrowid
            for cell in cells:
                row = {**cell, "fov_id": fid, "session_id": fov["session_id"]}
                c.execute(f"INSERT INTO cells ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                          [_sql(v) for v in row.values()])
            if active_s is not None:
                c.execute("UPDATE sessions SET active_s = ? WHERE id = ?", (float(active_s), fov["session_id"]))
        return fid

    # -- events (alerts) -------------------------------------------------------------------------------
    def add_event(self, kind: str, message: str, session_id: int | None = None) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO events (utc, kind, message, session_id) VALUES (?, ?, ?, ?)",
                      (utc_now(), kind, message, session_id))

    def events(self, limit: int = 50) -> list[dict]:
        return [dict(r) for r in self.query("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))]

    # -- maintenance ------------------------------------------------------------------------------------
    def referenced_images(self) -> set[str]:
        rows = self.query("SELECT image_path FROM fovs WHERE image_state = 'stored' UNION ALL "
                          "SELECT crop_path FROM cells WHERE crop_state = 'stored'")
        return {r[0] for r in rows if r[0]}

    def recover(self) -> dict:
        """At start-up: remove image files no committed row names (a crash before the commit) and temp files."""
        return self.images.sweep(self.referenced_images())

    def integrity(self) -> str:
        return self.one("PRAGMA integrity_check")[0]

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.one("SELECT value FROM meta WHERE key = ?", (key,))
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                      (key, value))

    def close(self) -> None:
        """Checkpoint the WAL, close every connection, release the lock."""
        if self.closed:
            return
        with self._wlock:
            self.closed = True
            with self._rlock:
                for c in self._readers:
                    c.close()
                self._readers.clear()
            try:
                self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._w.close()
        if self._lock is not None:
            self._lock.release()


class SessionConflict(Exception):
    """A session operation that contradicts the current state (409)."""


class _Tx:
    """`with store.transaction() as c:` BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error), on the writer."""

    def __init__(self, store: Store):
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._wlock.acquire()
        if self.store.closed:
            self.store._wlock.release()
            raise RuntimeError("the store is closed")
        self.store._w.execute("BEGIN IMMEDIATE")
        return self.store._w

    def __exit__(self, exc_type, exc, tb):
        try:
            self.store._w.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store._wlock.release()
        return False


def _sql(v):
    """dict / list values are stored as JSON text."""
    return json.dumps(v, separators=(",", ":"), default=float) if isinstance(v, (dict, list, tuple)) else v
