"""Image retention and the disk budget: the oldest images go first, results never do.

    hk = Housekeeper(store, retention_days=30, budget_bytes=5000 * 2**20)
    if hk.make_room(incoming_bytes): write the FOV's images  # else store the FOV without them
    hk.apply_retention()                                      # at start-up and every few minutes

Order of deletion under the budget: full-resolution FOV images, oldest first; then, if still over, cell
crops, oldest first (they are small and make the gallery). Rows are marked `deleted` in a transaction
BEFORE their files are unlinked, so a crash in between leaves unnamed files (swept at the next start),
never a row naming a missing file. Retention compares wall-clock capture times: timestamps before 2020
(a device whose clock was not yet set) are never taken as old.
"""
from __future__ import annotations

import datetime as dt

from cyto_edge.runtime.daemon.logs import event, get_logger
from cyto_edge.runtime.daemon.store import Store

log = get_logger("retention")
BATCH = 64
CLOCK_SANE = "2020-01-01"


class Housekeeper:
    def __init__(self, store: Store, retention_days: int | None, budget_bytes: int):
        self.store, self.retention_days, self.budget = store, retention_days, int(budget_bytes)
        row = store.one("SELECT (SELECT COALESCE(SUM(image_bytes), 0) FROM fovs WHERE image_state = 'stored') + "
                        "(SELECT COALESCE(SUM(crop_bytes), 0) FROM cells WHERE crop_state = 'stored')")
        self.stored_bytes = int(row[0])
        self.deleted_files = 0

    def added(self, nbytes: int) -> None:
        self.stored_bytes += int(nbytes)

    def make_room(self, incoming: int) -> bool:
        """Delete the oldest images until `incoming` more bytes fit in the budget; False if they never can."""
        if incoming > self.budget:
            return False
        for table in ("fovs", "cells"):
            while self.stored_bytes + incoming > self.budget:
                if not self._delete_oldest(table, self.stored_bytes + incoming - self.budget):
                    break
        return self.stored_bytes + incoming <= self.budget

    def apply_retention(self, now: dt.datetime | None = None) -> int:
        """Delete the images of FOVs captured more than retention_days ago; returns files deleted."""
        if not self.retention_days:
            return 0
        now = now or dt.datetime.now(dt.timezone.utc)
        cutoff = (now - dt.timedelta(days=self.retention_days)).isoformat(timespec="milliseconds")
        n = 0
        while True:
            ids = [r[0] for r in self.store.query(
                "SELECT id FROM fovs WHERE captured_utc < ? AND captured_utc >= ? AND (image_state = 'stored' OR "
                "id IN (SELECT fov_id FROM cells WHERE crop_state = 'stored')) ORDER BY id LIMIT ?",
                (cutoff, CLOCK_SANE, BATCH))]
            if not ids:
                break
            n += self._delete_fovs(ids)
        if n:
            event(log, "retention deleted old images", files=n, days=self.retention_days)
        return n

    # -- internals ------------------------------------------------------------------------------------------
    def _delete_oldest(self, table: str, need: int) -> bool:
        """Mark and unlink the oldest stored files of `table` until `need` bytes are freed (one batch)."""
        col, state = ("image", "image_state") if table == "fovs" else ("crop", "crop_state")
        with self.store.transaction() as c:
            rows = c.execute(f"SELECT id, {col}_path, {col}_bytes FROM {table} WHERE {state} = 'stored' "
                             "ORDER BY id LIMIT ?", (BATCH,)).fetchall()
            chosen, freed = [], 0
            for r in rows:      # only as many as needed (at least one): the budget is kept, not undershot
                chosen.append(r)
                freed += r[2]
                if freed >= need > 0:
                    break
            c.executemany(f"UPDATE {table} SET {state} = 'deleted' WHERE id = ?", [(r[0],) for r in chosen])
        if not chosen:
            return False
        self._unlink([r[1] for r in chosen], sum(r[2] for r in chosen))
        return True

    def _delete_fovs(self, fov_ids: list[int]) -> int:
        marks = ",".join("?" * len(fov_ids))
        with self.store.transaction() as c:
            imgs = c.execute(f"SELECT image_path, image_bytes FROM fovs WHERE id IN ({marks}) AND "
                             "image_state = 'stored'", fov_ids).fetchall()
            crops = c.execute(f"SELECT crop_path, crop_bytes FROM cells WHERE fov_id IN ({marks}) AND "
                              "crop_state = 'stored'", fov_ids).fetchall()
            c.execute(f"UPDATE fovs SET image_state = 'deleted' WHERE id IN ({marks}) AND image_state = 'stored'", fov_ids)
            c.execute(f"UPDATE cells SET crop_state = 'deleted' WHERE fov_id IN ({marks}) AND crop_state = 'stored'",
                      fov_ids)
        rows = list(imgs) + list(crops)
        self._unlink([r[0] for r in rows], sum(r[1] for r in rows))
        return len(rows)

    def _unlink(self, rels: list[str], nbytes: int) -> None:
        self.store.images.delete([r for r in rels if r])
        self.stored_bytes -= int(nbytes)
        self.deleted_files += len(rels)
