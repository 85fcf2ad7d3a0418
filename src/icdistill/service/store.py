"""The service's own tables in the pool's SQLite file: queries, the human-labelling queue, the budget ledger.

One file holds pool, queue and ledger (WAL, synchronous=FULL), so a copy of it is a whole service.
Every write commits before the caller acknowledges anything; a row is the source of truth after a
SIGKILL. Used from one thread only (the service's loop thread).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from icdistill.errors import ICDError

_GET = (
    "SELECT q.*, l.state AS ledger_state, l.attempts, l.calls, l.cost_usd, l.teacher "
    "FROM service_queries q LEFT JOIN service_ledger l USING (query_id) WHERE q.query_id = ?"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS service_queries (
    query_id TEXT PRIMARY KEY,
    position INTEGER NOT NULL UNIQUE,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    prompt TEXT NOT NULL,
    options TEXT,
    label TEXT,
    image_png BLOB,
    state TEXT NOT NULL,
    answer TEXT NOT NULL,
    uncertainty REAL,
    teacher_asked INTEGER NOT NULL,
    gate_reason TEXT,
    ctx_teacher_calls INTEGER NOT NULL,
    ctx_pool_size INTEGER NOT NULL,
    ctx_kind TEXT,
    demo_ids TEXT NOT NULL,
    teacher_answer TEXT,
    final_answer TEXT,
    answered_by TEXT,
    pool_status TEXT,
    error TEXT,
    claimed_by TEXT,
    claimed_until REAL
);
CREATE INDEX IF NOT EXISTS service_queries_state ON service_queries (state, position);
CREATE TABLE IF NOT EXISTS service_ledger (
    query_id TEXT PRIMARY KEY REFERENCES service_queries(query_id),
    teacher TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    calls INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS service_sessions_ended (
    sid TEXT PRIMARY KEY,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS service_imports (
    id INTEGER PRIMARY KEY,
    after_demo INTEGER NOT NULL,
    created REAL NOT NULL
);
"""

ANSWERED = "answered"
PENDING_TEACHER = "pending_teacher"
PENDING_HUMAN = "pending_human"
ANNOTATED = "annotated"
REJECTED = "rejected"
FAILED = "failed"
PENDING = (PENDING_TEACHER, PENDING_HUMAN)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class Store(Protocol):
    """The service's queries, labelling queue and budget ledger: ``ServiceStore`` (SQLite, one
    process) or ``PostgresServiceStore`` (one database shared by many ``icd serve`` processes).

    ``shared`` says whether other processes write too: then positions and the teacher-call count
    come from the store (``take_slot``), teacher work is leased per process (``heartbeat``, callable
    from any thread) and a dead process's work is adopted (``adopt_orphans``)."""

    shared: bool

    def add_query(self, row: dict[str, Any], teacher: str | None) -> None: ...
    def finish_query(
        self,
        query_id: str,
        *,
        state: str,
        teacher_answer: str | None,
        final_answer: str,
        answered_by: str,
        pool_status: str | None,
        error: str | None,
        calls: int,
        cost_usd: float,
        asked: bool = True,
        gate_reason: str | None = None,
    ) -> bool: ...
    def count_attempt(self, query_id: str) -> None: ...
    def get(self, query_id: str) -> dict[str, Any] | None: ...
    def read(self, query_id: str) -> dict[str, Any] | None: ...
    def pending(self, state: str) -> list[dict[str, Any]]: ...
    def gate_history(self) -> list[dict[str, Any]]: ...
    def take_slot(self) -> tuple[int, int | None]: ...
    def counts(self) -> dict[str, int]: ...
    def ledger_totals(self) -> dict[str, Any]: ...
    def claim_next(self, labeller: str, lease_s: float, skip: Sequence[str] = ()) -> dict[str, Any] | None: ...
    def release(self, query_id: str, labeller: str) -> None: ...
    def release_all(self) -> None: ...
    def heartbeat(self, query_ids: Sequence[str]) -> None: ...
    def adopt_orphans(self) -> list[str]: ...
    def end_session(self, sid: str, until: float) -> None: ...
    def ended_sessions(self) -> dict[str, float]: ...
    def begin_import(self) -> int | None: ...
    def end_import(self, import_id: int | None) -> None: ...
    def unfinished_import_rows(self) -> list[int]: ...
    def undo_imports(self) -> None: ...
    def close(self) -> None: ...


def _not_asked(
    asked: bool, gate_reason: str | None, query_id: str, queries: str, ledger: str, ph: str
) -> list[tuple[str, tuple[Any, ...]]]:
    """A query sent to the teacher that needed no call after all (a shared pool's label bought by
    another worker, or its global budget spent): not a teacher call in the stream nor in the ledger."""
    if asked:
        return []
    return [
        (f"UPDATE {queries} SET teacher_asked = false, gate_reason = {ph} WHERE query_id = {ph}", (gate_reason, query_id)),
        (f"DELETE FROM {ledger} WHERE query_id = {ph}", (query_id,)),
    ]


class ServiceStore:
    """The SQLite ``Store``: one process per file (the pool's lock)."""

    shared = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ICDError(f"cannot open service store {self.path}: {e}") from e
        self._reader: sqlite3.Connection | None = None  # ``read``'s own connection (WAL: never blocked)
        self._read_lock = threading.Lock()

    def _tx(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for sql, params in statements:
                self._db.execute(sql, params)
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise ICDError(f"could not write to {self.path}: {e}") from e

    # ------------------------------------------------------------------ queries
    def add_query(self, row: dict[str, Any], teacher: str | None) -> None:
        """The student's answer, and for a query sent to the teacher its image and a ledger entry: one commit."""
        now = time.time()
        state = row["state"]
        stmts: list[tuple[str, Sequence[Any]]] = [
            (
                "INSERT INTO service_queries (query_id, position, created, updated, prompt, options, image_png, "
                "state, answer, uncertainty, teacher_asked, gate_reason, ctx_teacher_calls, ctx_pool_size, "
                "ctx_kind, demo_ids, label) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row["query_id"],
                    row["position"],
                    now,
                    now,
                    row["prompt"],
                    json.dumps(list(row["options"])) if row.get("options") else None,
                    row.get("image_png") if state in PENDING else None,
                    state,
                    row["answer"],
                    _finite(row["uncertainty"]),
                    int(row["teacher_asked"]),
                    row["gate_reason"],
                    row["ctx_teacher_calls"],
                    row["ctx_pool_size"],
                    row.get("ctx_kind", ""),
                    json.dumps(row["demo_ids"]),
                    row.get("label"),
                ),
            )
        ]
        if row["teacher_asked"]:
            stmts.append(
                (
                    "INSERT INTO service_ledger (query_id, teacher, state, created, updated) VALUES (?, ?, 'reserved', ?, ?)",
                    (row["query_id"], teacher or "", now, now),
                )
            )
        self._tx(stmts)

    def finish_query(
        self,
        query_id: str,
        *,
        state: str,
        teacher_answer: str | None,
        final_answer: str,
        answered_by: str,
        pool_status: str | None,
        error: str | None,
        calls: int,
        cost_usd: float,
        asked: bool = True,
        gate_reason: str | None = None,
    ) -> bool:
        """Close a pending query and settle its ledger entry, in one commit. The image is dropped."""
        now = time.time()
        self._tx(
            [
                (
                    "UPDATE service_queries SET state = ?, teacher_answer = ?, final_answer = ?, answered_by = ?, "
                    "pool_status = ?, error = ?, image_png = NULL, claimed_by = NULL, claimed_until = NULL, "
                    "updated = ? WHERE query_id = ?",
                    (state, teacher_answer, final_answer, answered_by, pool_status, error, now, query_id),
                ),
                *_not_asked(asked, gate_reason, query_id, "service_queries", "service_ledger", "?"),
                (
                    "UPDATE service_ledger SET state = ?, calls = ?, cost_usd = ?, updated = ? WHERE query_id = ?",
                    ("failed" if state == FAILED else "paid", calls, cost_usd, now, query_id),
                ),
            ]
        )
        return True

    def count_attempt(self, query_id: str) -> None:
        """Written before each teacher request, so a request in flight at a crash is still on the books."""
        self._tx(
            [
                (
                    "UPDATE service_ledger SET attempts = attempts + 1, updated = ? WHERE query_id = ?",
                    (time.time(), query_id),
                )
            ]
        )

    def get(self, query_id: str) -> dict[str, Any] | None:
        row = self._db.execute(_GET, (query_id,)).fetchone()
        return dict(row) if row is not None else None

    def read(self, query_id: str) -> dict[str, Any] | None:
        """``get`` from any thread, on a connection of its own: a client reading a query never waits
        for the loop thread's model passes."""
        with self._read_lock:
            if self._reader is None:
                self._reader = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
                self._reader.row_factory = sqlite3.Row
            row = self._reader.execute(_GET, (query_id,)).fetchone()
        return dict(row) if row is not None else None

    def pending(self, state: str) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self._db.execute(
                "SELECT * FROM service_queries WHERE state = ? ORDER BY position", (state,)
            )
        ]

    def gate_history(self) -> list[dict[str, Any]]:
        """What the gate saw, in stream order, to replay it after a restart."""
        return [
            dict(r)
            for r in self._db.execute(
                "SELECT position, uncertainty, teacher_asked, ctx_teacher_calls, ctx_pool_size, ctx_kind "
                "FROM service_queries ORDER BY position"
            )
        ]

    def next_position(self) -> int:
        return int(
            self._db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM service_queries").fetchone()[0]
        )

    def take_slot(self) -> tuple[int, int | None]:
        """The next query's position; no shared call count (this process made every call)."""
        return self.next_position(), None

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in (ANSWERED, PENDING_TEACHER, PENDING_HUMAN, ANNOTATED, REJECTED, FAILED)}
        for state, n in self._db.execute("SELECT state, COUNT(*) FROM service_queries GROUP BY state"):
            out[state] = n
        return out

    def ledger_totals(self) -> dict[str, Any]:
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(attempts), 0), COALESCE(SUM(calls), 0), COALESCE(SUM(cost_usd), 0), "
            "COALESCE(SUM(state = 'paid'), 0), COALESCE(SUM(state = 'failed'), 0), "
            "COALESCE(SUM(state = 'reserved'), 0), COALESCE(SUM(MAX(attempts - 1, 0)), 0) FROM service_ledger"
        ).fetchone()
        keys = ("teacher_calls", "attempts", "requests", "cost_usd", "paid", "failed", "reserved", "rebought")
        out = dict(zip(keys, tuple(row), strict=True))
        # a request cut off by a crash and sent again was paid for twice: both count against --max-calls
        out["teacher_calls"] += out["rebought"]
        return out

    # ------------------------------------------------------------------ the human-labelling queue
    def claim_next(self, labeller: str, lease_s: float, skip: Sequence[str] = ()) -> dict[str, Any] | None:
        """The oldest queued item nobody else holds, leased to ``labeller`` (its own lease is renewed)."""
        now = time.time()
        held = self._db.execute(
            "SELECT query_id FROM service_queries WHERE state = ? AND claimed_by = ? AND claimed_until > ? "
            "ORDER BY position LIMIT 1",
            (PENDING_HUMAN, labeller, now),
        ).fetchone()
        if held is not None and held[0] not in skip:
            qid = held[0]
        else:
            marks = ",".join("?" * len(skip))
            not_skipped = f"AND query_id NOT IN ({marks})" if skip else ""
            row = self._db.execute(
                f"SELECT query_id FROM service_queries WHERE state = ? {not_skipped} "
                "AND (claimed_by IS NULL OR claimed_by = ? OR claimed_until <= ?) ORDER BY position LIMIT 1",
                (PENDING_HUMAN, *skip, labeller, now),
            ).fetchone()
            if row is None:
                return None
            qid = row[0]
        self._tx(
            [
                (
                    "UPDATE service_queries SET claimed_by = ?, claimed_until = ? WHERE query_id = ?",
                    (labeller, now + lease_s, qid),
                )
            ]
        )
        return self.get(qid)

    def release(self, query_id: str, labeller: str) -> None:
        self._tx(
            [
                (
                    "UPDATE service_queries SET claimed_by = NULL, claimed_until = NULL "
                    "WHERE query_id = ? AND claimed_by = ?",
                    (query_id, labeller),
                )
            ]
        )

    def release_all(self) -> None:
        self._tx(
            [
                (
                    "UPDATE service_queries SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by IS NOT NULL",
                    (),
                )
            ]
        )

    def heartbeat(self, query_ids: Sequence[str]) -> None:
        """Nothing to renew: no other process takes this file's work."""

    def adopt_orphans(self) -> list[str]:
        return []

    # ------------------------------------------------------------------ logouts
    def end_session(self, sid: str, until: float) -> None:
        """A logged-out session stays ended through restarts (until it would have expired anyway)."""
        self._tx(
            [
                ("DELETE FROM service_sessions_ended WHERE until <= ?", (time.time(),)),
                ("INSERT OR REPLACE INTO service_sessions_ended (sid, until) VALUES (?, ?)", (sid, until)),
            ]
        )

    def ended_sessions(self) -> dict[str, float]:
        rows = self._db.execute("SELECT sid, until FROM service_sessions_ended WHERE until > ?", (time.time(),))
        return {r[0]: float(r[1]) for r in rows}

    # ------------------------------------------------------------------ imports, all or nothing
    # The pool shares this file: an import notes the last annotation id before its first demo, and
    # deletes the note in the same breath as the client is answered. A note found at start means an
    # import was cut off (SIGKILL, power): every annotation after it is the import's, and is deleted.
    def begin_import(self) -> int | None:
        after = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM annotations").fetchone()[0]
        self._tx([("INSERT INTO service_imports (after_demo, created) VALUES (?, ?)", (after, time.time()))])
        return int(self._db.execute("SELECT MAX(id) FROM service_imports").fetchone()[0])

    def end_import(self, import_id: int | None) -> None:
        if import_id is not None:
            self._tx([("DELETE FROM service_imports WHERE id = ?", (import_id,))])

    def _undo_after(self) -> int | None:
        row = self._db.execute("SELECT MIN(after_demo) FROM service_imports").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def unfinished_import_rows(self) -> list[int]:
        """The annotation ids an unfinished import wrote (to take out of the pool's index first)."""
        after = self._undo_after()
        if after is None:
            return []
        return [int(r[0]) for r in self._db.execute("SELECT id FROM annotations WHERE id > ?", (after,))]

    def undo_imports(self) -> None:
        """Delete what unfinished imports wrote, and their notes: one commit (run again if cut off)."""
        after = self._undo_after()
        stmts: list[tuple[str, Sequence[Any]]] = [("DELETE FROM service_imports", ())]
        if after is not None:
            stmts = [
                ("DELETE FROM embeddings WHERE demo_id > ?", (after,)),
                ("DELETE FROM annotations WHERE id > ?", (after,)),
                *stmts,
            ]
        self._tx(stmts)

    def close(self) -> None:
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
        self._db.close()
