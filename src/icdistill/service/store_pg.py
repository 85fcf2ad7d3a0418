"""The service's tables in a PostgreSQL database shared by many ``icd serve`` processes.

The same ``Store`` as the SQLite ``ServiceStore`` (queries, the human-labelling queue, the
per-query budget ledger), plus what several processes need:

* positions come from a sequence and the teacher-call count from the table (``take_slot``), so every
  server's gate sees the whole stream's spend;
* a query sent to a model teacher is leased to the server that answered it (``claimed_by`` /
  ``claimed_until``, renewed by ``heartbeat``); when a server dies its lease runs out and another
  server, or its restart, adopts the work (``adopt_orphans``);
* the labelling queue is leased row by row with ``FOR UPDATE SKIP LOCKED``: two labellers on two
  servers never get one item.

The global teacher-call cap and the claim before a teacher call are the pool's (``PostgresPool``),
not this store's. Used from one thread (the service's loop thread), but for ``heartbeat`` and
``read`` (each its own connection, any thread); every write commits before the caller acknowledges
anything.

The database may restart under a running service: each connection is reopened with backoff and the
statement or transaction that failed run again (``icdistill.pool.pg_reconnect``) for up to ``reconnect_s``,
then a one-line ``DatabaseUnavailable``. Writes are idempotent when run again: a query's insert whose
commit landed is found by its id, a close that landed is recognised by its final state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from icdistill.errors import DatabaseUnavailable, ICDError
from icdistill.pool.pg_connection import _redact
from icdistill.pool.pg_reconnect import Reconnecting, first_line
from icdistill.pool.pg_schema import DB_NOW
from icdistill.service.store import (
    ANNOTATED,
    ANSWERED,
    FAILED,
    PENDING,
    PENDING_HUMAN,
    PENDING_TEACHER,
    REJECTED,
    _finite,
    _not_asked,
)

T = TypeVar("T")

_GET = (
    "SELECT q.*, l.state AS ledger_state, l.attempts, l.calls, l.cost_usd, l.teacher "
    "FROM icd_service_queries q LEFT JOIN icd_service_ledger l USING (query_id) WHERE q.query_id = %s"
)

_SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS icd_service_position MINVALUE 0 START 0;
CREATE TABLE IF NOT EXISTS icd_service_queries (
    query_id TEXT PRIMARY KEY,
    position BIGINT NOT NULL UNIQUE,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    prompt TEXT NOT NULL,
    options TEXT,
    label TEXT,
    image_png BYTEA,
    state TEXT NOT NULL,
    answer TEXT NOT NULL,
    uncertainty DOUBLE PRECISION,
    teacher_asked BOOLEAN NOT NULL,
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
    claimed_until DOUBLE PRECISION,
    server TEXT
);
CREATE INDEX IF NOT EXISTS icd_service_queries_state ON icd_service_queries (state, position);
CREATE INDEX IF NOT EXISTS icd_service_queries_asked ON icd_service_queries (position) WHERE teacher_asked;
CREATE TABLE IF NOT EXISTS icd_service_ledger (
    query_id TEXT PRIMARY KEY REFERENCES icd_service_queries(query_id),
    teacher TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    calls INTEGER NOT NULL DEFAULT 0,
    cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL
);
"""
_SESSIONS = "CREATE TABLE IF NOT EXISTS icd_service_sessions_ended (sid TEXT PRIMARY KEY, until DOUBLE PRECISION NOT NULL)"


class PostgresServiceStore:
    """The shared ``Store``. ``worker`` names this server in leases (the pool's worker id);
    ``lease_s`` is how long a silent server keeps its teacher work before another adopts it. Leases
    are on the database's clock (``DB_NOW``), never a server's."""

    shared = True

    def __init__(self, url: str, worker: str, lease_s: float, reconnect_s: float = 120.0) -> None:
        import psycopg
        from psycopg.rows import dict_row

        if lease_s <= 0:
            raise ICDError("the teacher-work lease must be > 0 seconds")
        self.url = url
        self.worker = worker
        self.lease_s = lease_s
        self._errors = psycopg.Error
        where = f"the service store in {_redact(url)}"

        def connect(rows: Any = dict_row) -> Any:
            return psycopg.connect(url, autocommit=True, row_factory=rows, connect_timeout=10)

        self._main = Reconnecting(connect, where, reconnect_s)
        self._beat = Reconnecting(lambda: connect(psycopg.rows.tuple_row), where, reconnect_s)  # heartbeat's
        self._reader = Reconnecting(connect, where, reconnect_s)  # ``read``'s, any thread
        try:
            db = self._main.open()
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(7414223)")  # one schema creator at a time
                # DDL locks the tables even when there is nothing to do: only a missing schema runs it
                if db.execute("SELECT to_regclass('icd_service_ledger') AS t").fetchone()["t"] is None:  # type: ignore[index]
                    db.execute(_SCHEMA)
                if db.execute("SELECT to_regclass('icd_service_sessions_ended') AS t").fetchone()["t"] is None:  # type: ignore[index]
                    db.execute(_SESSIONS)
        except psycopg.Error as e:
            self._main.close()  # a half-opened store holds no backend
            raise ICDError(f"cannot open the service store in {_redact(url)}: {e}") from e

    @property
    def reconnects(self) -> int:
        """Connections reopened after the database dropped them (tests, stats)."""
        return self._main.reconnects + self._beat.reconnects + self._reader.reconnects

    def _do(
        self,
        what: str,
        fn: Callable[[Any], T],
        again: Callable[[Any], T] | None = None,
        conn: Reconnecting | None = None,
    ) -> T:
        """``fn(connection)`` on the main (or ``conn``) connection, retried after a lost one; other
        database errors are a one-line ICDError."""
        try:
            return (conn or self._main).run(what, fn, again)
        except DatabaseUnavailable:
            raise
        except self._errors as e:
            raise ICDError(
                f"{what} failed in the service store in {_redact(self.url)}: {first_line(e)}"
            ) from e

    def _tx(
        self, statements: Sequence[tuple[str, Sequence[Any]]], again: Callable[[Any], list[int]] | None = None
    ) -> list[int]:
        """Run statements in one transaction; returns their row counts. ``again``: what to run
        instead after a lost connection (to recognise a commit that landed)."""

        def tx(db: Any) -> list[int]:
            with db.transaction():
                return [db.execute(sql, params).rowcount for sql, params in statements]

        return self._do("writing", tx, again)

    # ------------------------------------------------------------------ queries
    def take_slot(self) -> tuple[int, int | None]:
        """A fresh stream position, and the teacher calls every server has decided so far."""
        # run again after a lost connection, a position may be skipped: positions stay unique
        row = self._do(
            "taking a stream position",
            lambda db: db.execute(
                "SELECT nextval('icd_service_position') AS pos, "
                "(SELECT COUNT(*) FROM icd_service_queries WHERE teacher_asked) AS calls"
            ).fetchone(),
        )
        assert row is not None
        return int(row["pos"]), int(row["calls"])

    def add_query(self, row: dict[str, Any], teacher: str | None) -> None:
        now = time.time()
        state = row["state"]
        leased = state == PENDING_TEACHER  # this server's background work until its lease runs out
        stmts: list[tuple[str, Sequence[Any]]] = [
            (
                "INSERT INTO icd_service_queries (query_id, position, created, updated, prompt, options, image_png, "
                "state, answer, uncertainty, teacher_asked, gate_reason, ctx_teacher_calls, ctx_pool_size, "
                "ctx_kind, demo_ids, label, claimed_by, claimed_until, server) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, {DB_NOW} + %s, %s)",
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
                    bool(row["teacher_asked"]),
                    row["gate_reason"],
                    row["ctx_teacher_calls"],
                    row["ctx_pool_size"],
                    row.get("ctx_kind", ""),
                    json.dumps(row["demo_ids"]),
                    row.get("label"),
                    self.worker if leased else None,
                    self.lease_s if leased else None,  # the lease on the database's clock (NULL: none)
                    self.worker,
                ),
            )
        ]
        if row["teacher_asked"]:
            stmts.append(
                (
                    "INSERT INTO icd_service_ledger (query_id, teacher, state, created, updated) "
                    "VALUES (%s, %s, 'reserved', %s, %s)",
                    (row["query_id"], teacher or "", now, now),
                )
            )

        def again(db: Any) -> list[int]:  # the insert may have committed before the connection dropped
            found = db.execute(
                "SELECT 1 FROM icd_service_queries WHERE query_id = %s", (row["query_id"],)
            ).fetchone()
            if found is not None:
                return [1] * len(stmts)
            with db.transaction():
                return [db.execute(sql, params).rowcount for sql, params in stmts]

        self._tx(stmts, again)

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
        """Close a pending query and settle its ledger entry in one transaction. False (nothing
        written) when another server closed it first."""
        now = time.time()

        def close(db: Any) -> bool:
            with db.transaction():
                done = db.execute(
                    "UPDATE icd_service_queries SET state = %s, teacher_answer = %s, final_answer = %s, "
                    "answered_by = %s, pool_status = %s, error = %s, image_png = NULL, claimed_by = NULL, "
                    "claimed_until = NULL, updated = %s WHERE query_id = %s AND state = ANY(%s)",
                    (
                        state,
                        teacher_answer,
                        final_answer,
                        answered_by,
                        pool_status,
                        error,
                        now,
                        query_id,
                        list(PENDING),
                    ),
                ).rowcount
                if done:
                    db.execute(
                        "UPDATE icd_service_ledger SET state = %s, calls = %s, cost_usd = %s, updated = %s "
                        "WHERE query_id = %s",
                        ("failed" if state == FAILED else "paid", calls, cost_usd, now, query_id),
                    )
                    for sql, params in _not_asked(
                        asked, gate_reason, query_id, "icd_service_queries", "icd_service_ledger", "%s"
                    ):
                        db.execute(sql, params)
            return bool(done)

        def again(db: Any) -> bool:  # a close that committed before the connection dropped is ours
            if close(db):
                return True
            mine = db.execute(
                "SELECT 1 FROM icd_service_queries WHERE query_id = %s AND state = %s AND updated = %s",
                (query_id, state, now),
            ).fetchone()
            return mine is not None

        return self._do("closing a query", close, again)

    def count_attempt(self, query_id: str) -> None:
        now = time.time()
        stmt = ("UPDATE icd_service_ledger SET attempts = attempts + 1, updated = %s WHERE query_id = %s", (now, query_id))

        def again(db: Any) -> list[int]:  # the increment may have committed before the connection dropped
            found = db.execute(
                "SELECT 1 FROM icd_service_ledger WHERE query_id = %s AND updated = %s", (query_id, now)
            ).fetchone()
            if found is not None:
                return [1]
            with db.transaction():
                return [db.execute(*stmt).rowcount]

        self._tx([stmt], again)

    def get(self, query_id: str) -> dict[str, Any] | None:
        row = self._do("reading a query", lambda db: db.execute(_GET, (query_id,)).fetchone())
        return _plain(row) if row is not None else None

    def read(self, query_id: str) -> dict[str, Any] | None:
        """``get`` from any thread, on a connection of its own (never behind the loop thread)."""
        row = self._do(
            "reading a query", lambda db: db.execute(_GET, (query_id,)).fetchone(), conn=self._reader
        )
        return _plain(row) if row is not None else None

    def pending(self, state: str) -> list[dict[str, Any]]:
        rows = self._do(
            "reading pending queries",
            lambda db: db.execute(
                "SELECT * FROM icd_service_queries WHERE state = %s ORDER BY position", (state,)
            ).fetchall(),
        )
        return [_plain(r) for r in rows]

    def gate_history(self) -> list[dict[str, Any]]:
        """The whole stream, every server's queries, in position order."""
        return self._do(
            "reading the stream",
            lambda db: db.execute(
                "SELECT position, uncertainty, teacher_asked, ctx_teacher_calls, ctx_pool_size, ctx_kind "
                "FROM icd_service_queries ORDER BY position"
            ).fetchall(),
        )

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in (ANSWERED, PENDING_TEACHER, PENDING_HUMAN, ANNOTATED, REJECTED, FAILED)}
        rows = self._do(
            "counting queries",
            lambda db: db.execute(
                "SELECT state, COUNT(*) AS n FROM icd_service_queries GROUP BY state"
            ).fetchall(),
        )
        for r in rows:
            out[r["state"]] = int(r["n"])
        return out

    def ledger_totals(self) -> dict[str, Any]:
        row = self._do(
            "reading the ledger",
            lambda db: db.execute(
                "SELECT COUNT(*) AS teacher_calls, COALESCE(SUM(attempts), 0) AS attempts, "
                "COALESCE(SUM(calls), 0) AS requests, COALESCE(SUM(cost_usd), 0) AS cost_usd, "
                "COUNT(*) FILTER (WHERE state = 'paid') AS paid, COUNT(*) FILTER (WHERE state = 'failed') AS failed, "
                "COUNT(*) FILTER (WHERE state = 'reserved') AS reserved, "
                "COALESCE(SUM(GREATEST(attempts - 1, 0)), 0) AS rebought FROM icd_service_ledger"
            ).fetchone(),
        )
        assert row is not None
        out = {k: (float(v) if k == "cost_usd" else int(v)) for k, v in row.items()}
        out["teacher_calls"] += out["rebought"]  # requests re-sent after a crash were paid twice
        return out

    # ------------------------------------------------------------------ teacher work of dead servers
    def heartbeat(self, query_ids: Sequence[str]) -> None:
        """Renew this server's leases on its teacher work in flight (``query_ids``; the rest lapses, so
        work whose attempt failed here is adopted again). Any thread: it has its own connection, so a
        loop thread busy with a queue of student passes does not let them lapse."""
        self._do(
            "renewing leases",
            lambda db: db.execute(
                f"UPDATE icd_service_queries SET claimed_until = {DB_NOW} + %s "
                "WHERE claimed_by = %s AND state = %s AND query_id = ANY(%s)",
                (self.lease_s, self.worker, PENDING_TEACHER, list(query_ids)),
            ),
            conn=self._beat,
        )

    def adopt_orphans(self) -> list[str]:
        """Lease to this server the teacher work whose server went silent (killed, or gone before
        the lease was written); returns the adopted query ids, oldest first."""
        # run again after a lost connection, work adopted by a commit whose reply was lost stays
        # leased to this server until its lease runs out, then is adopted again
        rows = self._do(
            "adopting orphaned work",
            lambda db: db.execute(
                f"UPDATE icd_service_queries SET claimed_by = %s, claimed_until = {DB_NOW} + %s WHERE query_id IN ("
                "SELECT query_id FROM icd_service_queries WHERE state = %s "
                f"AND (claimed_until IS NULL OR claimed_until < {DB_NOW}) FOR UPDATE SKIP LOCKED) "
                "RETURNING query_id, position",
                (self.worker, self.lease_s, PENDING_TEACHER),
            ).fetchall(),
        )
        return [r["query_id"] for r in sorted(rows, key=lambda r: r["position"])]

    # ------------------------------------------------------------------ the human-labelling queue
    def claim_next(self, labeller: str, lease_s: float, skip: Sequence[str] = ()) -> dict[str, Any] | None:
        """The oldest queued item nobody else holds (this labeller's own first), leased to ``labeller``;
        one statement, so two servers never lease one item to two people."""
        row = self._do(
            "leasing a queued item",
            lambda db: db.execute(
                f"UPDATE icd_service_queries SET claimed_by = %s, claimed_until = {DB_NOW} + %s WHERE query_id = ("
                "SELECT query_id FROM icd_service_queries WHERE state = %s AND NOT (query_id = ANY(%s)) "
                f"AND (claimed_by IS NULL OR claimed_by = %s OR claimed_until <= {DB_NOW}) "
                f"ORDER BY (claimed_by IS NOT DISTINCT FROM %s AND claimed_until > {DB_NOW}) DESC, position "
                "LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING query_id",
                (labeller, lease_s, PENDING_HUMAN, list(skip), labeller, labeller),
            ).fetchone(),
        )
        return self.get(row["query_id"]) if row is not None else None

    def release(self, query_id: str, labeller: str) -> None:
        self._do(
            "releasing a queued item",
            lambda db: db.execute(
                "UPDATE icd_service_queries SET claimed_by = NULL, claimed_until = NULL "
                "WHERE query_id = %s AND claimed_by = %s AND state = %s",
                (query_id, labeller, PENDING_HUMAN),
            ),
        )

    def release_all(self) -> None:
        """Nothing: the leases may belong to people labelling on another server; they run out."""

    # ------------------------------------------------------------------ logouts
    def end_session(self, sid: str, until: float) -> None:
        """A logged-out session stays ended through restarts (read by every server when it starts)."""
        self._tx(
            [
                ("DELETE FROM icd_service_sessions_ended WHERE until <= %s", (time.time(),)),
                (
                    "INSERT INTO icd_service_sessions_ended (sid, until) VALUES (%s, %s) "
                    "ON CONFLICT (sid) DO UPDATE SET until = EXCLUDED.until",
                    (sid, until),
                ),
            ]
        )

    def ended_sessions(self) -> dict[str, float]:
        rows = self._do(
            "reading ended sessions",
            lambda db: db.execute(
                "SELECT sid, until FROM icd_service_sessions_ended WHERE until > %s", (time.time(),)
            ).fetchall(),
        )
        return {r["sid"]: float(r["until"]) for r in rows}

    # ------------------------------------------------------------------ imports
    # The shared pool's demos are written by PostgresPool in its own tables: an import cut off by a
    # crash is not journaled here (see the README's serve section).
    def begin_import(self) -> int | None:
        return None

    def end_import(self, import_id: int | None) -> None:
        """Nothing to close (see ``begin_import``)."""

    def unfinished_import_rows(self) -> list[int]:
        return []

    def undo_imports(self) -> None:
        """Nothing to undo (see ``begin_import``)."""

    def close(self) -> None:
        for conn in (self._main, self._beat, self._reader):
            conn.close()


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """BYTEA as bytes, the asked flag as the SQLite store's 0/1."""
    out = {k: bytes(v) if isinstance(v, memoryview) else v for k, v in row.items()}
    if "teacher_asked" in out:
        out["teacher_asked"] = int(out["teacher_asked"])
    return out
