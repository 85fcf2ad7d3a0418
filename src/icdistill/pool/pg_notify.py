"""Keeping a worker's copy of the PostgreSQL pool in step: the initial load from one snapshot, then
LISTEN/NOTIFY (other workers' commits and evictions), with a count check and a catch-up by id."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from icdistill.errors import ICDError
from icdistill.pool.demos import (
    DEMO_COLUMNS,
    read_vectors,
    stored_demo,
)
from icdistill.pool.pg_schema import CHANNEL, CHECK_ROUNDS, CLAIMS_CHANNEL
from icdistill.pool.shared_index import SharedIndexes
from icdistill.types import Embeddings

log = logging.getLogger(__name__)

_POOLED_ROWS = f"SELECT {DEMO_COLUMNS} FROM icd_annotations WHERE in_pool ORDER BY id"


class _Notifications:
    """The sync part of ``PostgresPool`` (load, LISTEN/NOTIFY, catch-up; a mixin: it works on
    the pool's own state)."""

    @staticmethod
    def _listen_to(conn: Any) -> None:
        conn.execute(f"LISTEN {CHANNEL}")
        conn.execute(f"LISTEN {CLAIMS_CHANNEL}")

    # ------------------------------------------------------------------ sync
    def _load(self) -> None:
        if isinstance(self._index, SharedIndexes):  # a host-shared index: map it, read only what it lacks
            try:
                rows = self._index.open(
                    self._db,
                    lambda: self._db.execute(_POOLED_ROWS).fetchall(),
                )
            except OSError as e:  # an unwritable or full snapshot folder: this worker keeps its own copy
                folder = self._index.store.folder
                log.warning("cannot use the shared index in %s (%s): this worker keeps its own", folder, e)
                self._index = self._own_index
            else:
                self._add_loaded(rows)
                return
        loaded: list[tuple[str, np.ndarray, np.ndarray]] = []
        # every read from one snapshot: a demo committed between them would be loaded without its
        # vectors (and its notification then skipped as known), an eviction would leave a stale vector
        with self._db.transaction():
            self._db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            pooled = "FROM icd_embeddings e JOIN icd_annotations a ON a.id = e.demo_id WHERE a.in_pool"
            counts = self._db.execute(
                f"SELECT e.key, COUNT(*) {pooled} GROUP BY e.key ORDER BY e.key"
            ).fetchall()
            for key, count in counts:
                # a server-side cursor: one key's vectors at a time, never every row's bytes at once
                with self._db.cursor(name="icd_load_vectors") as cur:
                    cur.itersize = 4096
                    cur.execute(f"SELECT e.demo_id, e.vec {pooled} AND e.key = %s ORDER BY e.demo_id", (key,))
                    ids, mat = read_vectors(cur, int(count))
                if mat is not None:
                    loaded.append((key, ids, mat))
            rows = self._db.execute(_POOLED_ROWS).fetchall()
        # the graphs are built outside the snapshot (minutes at 1M: no transaction held that long)
        while loaded:
            key, ids, mat = loaded.pop(0)
            self._index.load(key, ids, mat)
        self._add_loaded(rows)

    def _add_loaded(self, rows: list[tuple[Any, ...]]) -> None:
        for row in rows:
            demo = self._demos[row[0]] = stored_demo(
                row, self._index.embeddings_of(row[0]), self.images, self._shared
            )
            self._kinds.add(demo.id, demo.provenance.get("options"))

    def _fetch_image(self, demo_id: int) -> bytes | None:
        if self._closed:  # not a lost connection to reopen: nothing would close it again
            raise ICDError("the pool is closed")
        row = self._on_listener(
            "reading a demo's image",
            lambda c: c.execute("SELECT image_png FROM icd_annotations WHERE id = %s", (demo_id,)).fetchone(),
        )
        if row is None:
            raise ICDError("no such annotation")
        return bytes(row[0]) if row[0] is not None else None

    def _drain(self, conn: Any, timeout: float = 0.0, claim: str | None = None) -> bool:
        """Move the notifications ``conn`` (the listener) has received into the pending changes,
        waiting up to ``timeout`` for the first; True when one says ``claim`` was deleted."""
        added, removed = self._pending
        freed = False
        for note in conn.notifies(timeout=timeout, stop_after=1 if timeout else None):
            if note.channel == CLAIMS_CHANNEL:
                freed = freed or note.payload == claim
                continue
            for part in note.payload.split(","):
                if part.startswith("-"):
                    removed.append(int(part[1:]))
                elif part:
                    added.append(int(part))
        if timeout and not freed:  # more may have come with the first
            freed = self._drain(conn, 0.0, claim)
        return freed

    def refresh(self) -> int:
        """Apply the other workers' committed changes (new demos, evictions). Returns how many.

        The notifications received are applied first; every ``catchup_s`` a count check (on the
        listener, so the notifications of every commit it counts have arrived when it returns)
        compares the pool with ours, and only a disagreement that applying them does not resolve, or
        a lost listener, re-reads every pooled id. A shared index due for a new snapshot is merged
        after, outside the listener's lock."""
        changed = self._refresh_locked()
        self._roll_index()
        return changed

    def _roll_index(self) -> None:
        """Let a host-shared index map a newer snapshot or merge its delta (``SharedIndexes``); called
        with no lock held, so claims and images are served by other threads meanwhile."""
        roll = getattr(self._index, "maybe_roll", None)
        if roll is not None:
            roll()

    def _refresh_locked(self) -> int:
        check = time.monotonic() >= self._next_check
        if check:
            self._next_check = time.monotonic() + self.catchup_s
        with self._listen_lock:
            self._on_listener("reading notifications", self._drain)
            changed = self._apply_pending()
            for _round in range(CHECK_ROUNDS if check and not self._must_catch_up else 0):
                n, top = self._on_listener("checking the pool", self._count_pooled)
                changed += self._apply_pending()
                if n == len(self._demos) and (not n or top == max(self._demos)):
                    return changed
            if check or self._must_catch_up:
                self._must_catch_up = False
                return changed + self._retrying("catching up with the pool", self._catch_up)
        return changed

    def _count_pooled(self, conn: Any) -> tuple[int, int]:
        n, top = conn.execute(
            "SELECT COUNT(*), COALESCE(MAX(id), 0) FROM icd_annotations WHERE in_pool"
        ).fetchone()
        self._drain(conn)
        return int(n), int(top)

    def _apply_pending(self) -> int:
        added, removed = self._pending
        self._pending = ([], [])
        if not added and not removed:
            return 0
        try:
            return self._apply(added, removed)
        except BaseException:
            self._must_catch_up = True  # what was read is lost: the next refresh compares ids
            raise

    def _catch_up(self) -> int:
        """Sync by id: the pooled ids in the table against ours (after a lost notification)."""
        self.full_catchups += 1
        pooled = {int(r[0]) for r in self._db.execute("SELECT id FROM icd_annotations WHERE in_pool")}
        mine = set(self._demos)
        return self._apply(sorted(pooled - mine), sorted(mine - pooled))

    def _apply(self, added: list[int], removed: list[int]) -> int:
        for demo_id in removed:
            if self._demos.pop(demo_id, None) is not None:
                self._index.remove(demo_id)
                self._kinds.remove(demo_id)
        fresh = sorted(i for i in set(added) if i not in self._demos and i not in removed)
        if fresh:  # only these need the database
            vecs, rows = self._retrying("reading new demos", lambda: self._read_demos(fresh))
            for row in rows:
                demo = stored_demo(row, vecs.get(row[0], {}), self.images, self._shared)
                self._demos[demo.id] = demo
                self._index.add(demo.id, demo.embeddings)
                demo.embeddings = self._index.embeddings_of(demo.id)  # the index holds the one copy
                self._kinds.add(demo.id, demo.provenance.get("options"))
        return len(fresh) + len(removed)

    def _read_demos(self, ids: list[int]) -> tuple[dict[int, Embeddings], list[tuple[Any, ...]]]:
        vecs: dict[int, Embeddings] = {}
        for demo_id, key, blob in self._db.execute(
            "SELECT demo_id, key, vec FROM icd_embeddings WHERE demo_id = ANY(%s)", (ids,)
        ):
            vecs.setdefault(demo_id, {})[key] = np.frombuffer(blob, dtype=np.float32).copy()
        rows = self._db.execute(
            f"SELECT {DEMO_COLUMNS} FROM icd_annotations WHERE id = ANY(%s) AND in_pool ORDER BY id", (ids,)
        ).fetchall()
        return vecs, rows
