"""A demonstration pool shared by many workers: PostgreSQL holds the truth, each worker an index.

PostgreSQL holds the annotations (images, embeddings, answers), the labelling queue (``icd_claims``:
which image+prompt a worker is buying right now) and the budget ledger (``icd_ledger``). Every
worker keeps its own in-memory copy of the pooled demos and a ``VectorIndex`` per key, kept in sync
by LISTEN/NOTIFY: a demo committed by one worker is announced at commit, and the others pick it up
on their next read (``refresh``), so a new demo is visible within one query.

Buying a label once across workers: a worker first *claims* the image+prompt (a row keyed on both,
inserted only if absent or expired) in the same transaction that charges the global ledger; only the
claimant calls the teacher; its demo and the release of the claim commit together. A worker killed
mid-call leaves only a claim, which expires after ``lease_s``; nothing half-written (one transaction
per annotation). A unique index on image digest + prompt among pooled demos makes a twin impossible
even if two workers race past their claims.

Query ids are namespaced by an *owner* (a run folder, or ``""`` for the service, whose ids are
UUIDs): two workers fed the same dataset share query ids, and one worker's annotation of ``q5`` is
not the other's crash-recovered ``q5`` but a label already bought (a pool hit, not a teacher call).

A connection can drop (the server restarts, an admin terminates the backend). The work connection
reconnects with backoff and retries the statement or transaction that failed (each is idempotent:
a transaction that never committed left nothing, and one that did is found again by its key) for up
to ``reconnect_s`` seconds, then stops with a one-line ``PoolUnavailable`` (resume once the database
is back). The listener reconnects, re-LISTENs and catches up by id; a cheap count check every
``catchup_s`` seconds, run after the notifications already received are applied, covers a drop that
raised nothing, and re-reads the pooled ids only when it still disagrees.

Connections: two per pool, the work connection and the listener; the listener also reads demos'
images and renews claims (a connection that only LISTENs is idle between notifications). A claim's
lease runs on the database's clock, never a worker's. Every connection sets ``statement_timeout``
and TCP keepalives, so a hung query or a dead peer is an error, not a hang.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from icdistill.index import IndexConfig
from icdistill.pool import (
    DEMO_COLUMNS,
    AddStatus,
    DemoImages,
    _Index,
    _Kinds,
    _unit,
    pooled_demo,
    read_vectors,
    stored_demo,
)
from icdistill.types import (
    Annotation,
    Demo,
    Embeddings,
    ICDError,
    Query,
    TeacherError,
    Usage,
    image_digest,
    image_to_png,
)

ClaimResult = Literal["claimed", "pooled", "busy", "budget"]
T = TypeVar("T")

CHANNEL = "icd_pool"
# a claim deleted (its demo committed, or released): the item's image digest (or text claim key)
CLAIMS_CHANNEL = "icd_pool_claims"
# the database's clock in seconds since the epoch: leases compare times of many hosts
DB_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::float8"
# how many times a count check that disagrees is retried after applying the notifications it brought
CHECK_ROUNDS = 3

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS icd_annotations (
    id BIGSERIAL PRIMARY KEY,
    owner TEXT NOT NULL DEFAULT '',
    query_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    image_png BYTEA,
    image_ref TEXT,
    image_digest TEXT,
    prompt TEXT NOT NULL,
    options TEXT,
    answer TEXT NOT NULL,
    accepted BOOLEAN NOT NULL,
    in_pool BOOLEAN NOT NULL,
    status TEXT NOT NULL,
    teacher TEXT,
    samples TEXT,
    votes TEXT,
    agreement DOUBLE PRECISION,
    usage TEXT,
    seconds DOUBLE PRECISION,
    created DOUBLE PRECISION,
    worker TEXT
);
-- a pool made before owners: its query ids become the default owner's
ALTER TABLE icd_annotations ADD COLUMN IF NOT EXISTS owner TEXT NOT NULL DEFAULT '';
ALTER TABLE icd_annotations DROP CONSTRAINT IF EXISTS icd_annotations_query_id_key;
CREATE UNIQUE INDEX IF NOT EXISTS icd_one_query_per_owner ON icd_annotations (owner, query_id);
CREATE UNIQUE INDEX IF NOT EXISTS icd_one_demo_per_item
    ON icd_annotations (image_digest, prompt) WHERE in_pool AND image_digest IS NOT NULL;
CREATE INDEX IF NOT EXISTS icd_in_pool ON icd_annotations (id) WHERE in_pool;
CREATE TABLE IF NOT EXISTS icd_embeddings (
    demo_id BIGINT NOT NULL REFERENCES icd_annotations(id),
    key TEXT NOT NULL,
    vec BYTEA NOT NULL,
    PRIMARY KEY (demo_id, key)
);
CREATE TABLE IF NOT EXISTS icd_claims (
    image_digest TEXT NOT NULL,
    prompt TEXT NOT NULL,
    query_id TEXT NOT NULL,
    worker TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (image_digest, prompt)
);
CREATE TABLE IF NOT EXISTS icd_ledger (
    name TEXT PRIMARY KEY,
    calls BIGINT NOT NULL DEFAULT 0,
    cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    max_calls BIGINT
);
-- the global dollar cap (a ledger made before it gets the columns)
ALTER TABLE icd_ledger ADD COLUMN IF NOT EXISTS max_cost_usd DOUBLE PRECISION;
ALTER TABLE icd_ledger ADD COLUMN IF NOT EXISTS dearest_call_usd DOUBLE PRECISION NOT NULL DEFAULT 0;
"""


def is_postgres_url(spec: str | os.PathLike[str] | None) -> bool:
    return isinstance(spec, str) and spec.startswith(("postgresql://", "postgres://"))


class PoolUnavailable(ICDError):
    """The pool's database stayed out of reach for ``reconnect_s`` seconds: the work stops here, and
    what was stored is kept (resume once the database is back)."""


class PostgresPool:
    """The ``Pool`` of ``SQLitePool`` (same reads, same ``add`` statuses) over a PostgreSQL database.

    ``max_calls`` and ``max_cost_usd`` cap teacher calls and dollars across every worker of the pool
    (the ledger ``ledger``; see ``_charge`` for how dollars are reserved before a call's cost is known);
    ``lease_s`` is how long a claim protects a purchase in progress (``renew_claims`` extends it).
    ``owner`` is the namespace of this worker's query ids: ``annotation_for`` recovers only its own
    (a resumed run finds what its killed process stored, never another run's annotation of an item
    with the same id). ``take_over``: this process holds the owner's exclusive lock (a run folder's),
    so every earlier worker of the owner is dead and its claims become this worker's at once (a
    resumed run does not wait out its predecessor's leases, nor buy those items twice).
    ``reconnect_s`` bounds how long a lost database is retried; ``statement_timeout_s`` how long one
    statement (a lock wait included) may run.
    """

    def __init__(
        self,
        url: str,
        max_size: int | None = None,
        *,
        index: IndexConfig | None = None,
        index_dir: str | Path | None = None,
        ledger: str = "default",
        max_calls: int | None = None,
        max_cost_usd: float | None = None,
        lease_s: float = 120.0,
        worker: str | None = None,
        owner: str = "",
        catchup_s: float = 5.0,
        take_over: bool = False,
        reconnect_s: float = 120.0,
        statement_timeout_s: float = 120.0,
    ) -> None:
        try:
            import psycopg
        except ImportError as e:  # pragma: no cover - the extra is installed by the test command
            raise ICDError("a PostgreSQL pool needs psycopg: pip install 'icdistill[pg]'") from e
        if max_size is not None and max_size < 1:
            raise ICDError("pool max size must be >= 1")
        if lease_s <= 0:
            raise ICDError("claim lease must be > 0 seconds")
        if max_cost_usd is not None and not max_cost_usd >= 0:
            raise ICDError(f"--max-cost must be >= 0, got {max_cost_usd}")
        self._psycopg = psycopg
        self.url = url
        self.max_size = max_size
        self.ledger = ledger
        self.lease_s = lease_s
        self.owner = owner
        host = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        # an owner's workers share a prefix: a successor holding the owner's lock finds their claims
        self.worker = worker or (f"{owner}|{host}" if owner else host)
        self.catchup_s = catchup_s
        self.reconnect_s = reconnect_s
        self.reconnects = 0  # listener reconnections (for tests and stats)
        self.db_reconnects = 0  # work connection reconnections
        self.full_catchups = 0  # re-reads of every pooled id (a lost notification)
        self._connect_kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": 10,
            # a dead peer (host gone, network cut) is noticed in about a minute, not hours
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            "options": f"-c statement_timeout={int(statement_timeout_s * 1000)}",
        }
        # the listener also reads demos' images and renews claims, from any thread: one at a time
        self._listen_lock = threading.RLock()
        self._db: Any = None
        self._listen: Any = None
        self._pending: tuple[list[int], list[int]] = ([], [])  # notified, not applied: added, removed
        self._must_catch_up = False  # the listener was lost: notifications may be missing
        self.images = DemoImages(self._fetch_image, f"pool {_redact(url)}")
        self._shared: dict[Any, Any] = {}  # values many demos repeat (see stored_demo)
        self._closed = False
        try:
            self._db = self._connect()
            self._listen = self._connect()
        except psycopg.Error as e:
            self._close_connections()
            raise ICDError(f"cannot connect to pool {_redact(url)}: {e}") from e
        try:
            self._open(ledger, max_calls, max_cost_usd, index, index_dir)
            if take_over:
                self.take_over_claims()
        except BaseException as e:
            self._close_connections()  # a half-opened pool holds no backends
            if isinstance(e, psycopg.Error):
                raise ICDError(f"cannot open pool {_redact(url)}: {e}") from e
            raise

    def _connect(self) -> Any:
        return self._psycopg.connect(self.url, **self._connect_kwargs)

    def _open(
        self,
        ledger: str,
        max_calls: int | None,
        max_cost_usd: float | None,
        index: IndexConfig | None,
        index_dir: Any,
    ) -> None:
        with self._db.transaction():
            # one schema creator at a time: concurrent CREATE ... IF NOT EXISTS can still collide
            self._db.execute("SELECT pg_advisory_xact_lock(7414221)")
            # DDL locks the tables even when there is nothing to do: a worker joining a pool in use
            # would stall the others (and their claims could run out), so only a missing or old
            # schema runs it
            current = self._db.execute(
                "SELECT to_regclass('icd_one_query_per_owner') IS NOT NULL AND EXISTS (SELECT 1 FROM "
                "information_schema.columns WHERE table_name = 'icd_ledger' AND column_name = 'dearest_call_usd')"
            ).fetchone()
            if current is None or not current[0]:
                self._db.execute(_SCHEMA)
            self._db.execute(
                "INSERT INTO icd_ledger (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (ledger,)
            )
            caps = self._db.execute(
                "SELECT max_calls, max_cost_usd FROM icd_ledger WHERE name = %s FOR UPDATE", (ledger,)
            ).fetchone()
            for column, flag, asked, cap in (
                ("max_calls", "--max-calls", max_calls, caps[0]),
                ("max_cost_usd", "--max-cost", max_cost_usd, caps[1]),
            ):
                if asked is None:
                    continue
                if cap is None:
                    self._db.execute(f"UPDATE icd_ledger SET {column} = %s WHERE name = %s", (asked, ledger))
                elif cap != asked:
                    # a joining worker must not silently move the budget every running worker spends
                    raise ICDError(
                        f"the pool's budget ledger {ledger!r} has {flag} {cap}, this worker asked for "
                        f"{flag} {asked}: pass the same cap (or none to join it)"
                    )
        self._listen_to(self._listen)
        self._next_check = time.monotonic() + self.catchup_s
        self._demos: dict[int, Demo] = {}
        self._index = _Index(Path(index_dir) if index_dir is not None else None, index)
        self._kinds = _Kinds()
        self._load()

    @staticmethod
    def _listen_to(conn: Any) -> None:
        conn.execute(f"LISTEN {CHANNEL}")
        conn.execute(f"LISTEN {CLAIMS_CHANNEL}")

    # ------------------------------------------------------------------ connections
    def _lost(self, e: BaseException, conn: Any) -> bool:
        """Whether ``e`` means the connection (or the server) is gone, not that the statement failed."""
        if not isinstance(e, self._psycopg.OperationalError):
            return False
        if conn is None or conn.closed or conn.broken:
            return True
        state = getattr(e, "sqlstate", None)
        # 08: connection exception; 57P01-57P03: admin/crash shutdown, cannot connect now
        return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` on the work connection; a lost connection is reopened with backoff and ``fn`` run
        again (every caller's work is idempotent) for up to ``reconnect_s``; other database errors
        are an ICDError (an integrity error is the caller's to read)."""
        deadline: float | None = None
        delay = 0.1
        while True:
            if self._closed:
                raise ICDError("the pool is closed")
            try:
                if self._db is None or self._db.closed or self._db.broken:
                    with contextlib.suppress(Exception):
                        self._db.close()
                    self._db = self._connect()
                    self.db_reconnects += 1
                return fn()
            except self._psycopg.IntegrityError:
                raise
            except self._psycopg.Error as e:
                if not self._lost(e, self._db):
                    raise ICDError(f"pool {_redact(self.url)}: {what} failed: {_first_line(e)}") from e
                deadline = self._backoff(deadline, e, what)
                delay = _sleep(delay)

    def _backoff(self, deadline: float | None, e: BaseException, what: str) -> float:
        """The retry deadline of a lost connection (set on its first loss); past it, PoolUnavailable."""
        now = time.monotonic()
        if deadline is None:
            log.warning("lost the pool database while %s (%s): reconnecting", what, _first_line(e))
            return now + self.reconnect_s
        if now > deadline:
            raise PoolUnavailable(
                f"lost the pool database {_redact(self.url)} for {self.reconnect_s:g} s while {what} "
                f"({_first_line(e)}); what was stored is kept: resume once the database is back"
            ) from None
        return deadline

    def _on_listener(self, what: str, fn: Callable[[Any], T]) -> T:
        """``fn(listener)`` under the listener's lock; a lost listener is reopened (it LISTENs again,
        and the next refresh catches up by id, since notifications may have been lost meanwhile)."""
        deadline: float | None = None
        delay = 0.1
        with self._listen_lock:
            while True:
                if self._closed:
                    raise ICDError("the pool is closed")
                try:
                    if self._listen is None or self._listen.closed or self._listen.broken:
                        with contextlib.suppress(Exception):
                            self._listen.close()
                        self._listen = None
                        conn = self._connect()
                        self._listen_to(conn)
                        self._listen = conn
                        self.reconnects += 1
                        self._must_catch_up = True
                    return fn(self._listen)
                except self._psycopg.Error as e:
                    if not self._lost(e, self._listen):
                        raise ICDError(f"pool {_redact(self.url)}: {what} failed: {_first_line(e)}") from e
                    with contextlib.suppress(Exception):
                        self._listen.close()
                    deadline = self._backoff(deadline, e, what)
                    delay = _sleep(delay)

    # ------------------------------------------------------------------ sync
    def _load(self) -> None:
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
            rows = self._db.execute(
                f"SELECT {DEMO_COLUMNS} FROM icd_annotations WHERE in_pool ORDER BY id"
            ).fetchall()
        # the graphs are built outside the snapshot (minutes at 1M: no transaction held that long)
        while loaded:
            key, ids, mat = loaded.pop(0)
            self._index.load(key, ids, mat)
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
        a lost listener, re-reads every pooled id."""
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

    # ------------------------------------------------------------------ reading (the Pool protocol)
    def __len__(self) -> int:
        self.refresh()
        return len(self._demos)

    def demos(self) -> list[Demo]:
        self.refresh()
        return list(self._demos.values())

    def get(self, demo_id: int) -> Demo:
        return self._demos[demo_id]

    def vectors(self, key: str) -> tuple[list[int], np.ndarray]:
        self.refresh()
        return self._index.get(key)

    def search(
        self,
        key: str,
        vector: np.ndarray,
        k: int,
        candidates: list[int] | np.ndarray | None = None,
        keep_ties: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        self.refresh()
        return self._index.search(key, vector, k, candidates, keep_ties)

    def index_status(self) -> dict[str, str]:
        return dict(self._index.opened)

    def kind_ids(self, options: Any) -> np.ndarray | None:
        self.refresh()
        return self._kinds.ids(options)

    def answers(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.demos():
            out[d.answer] = out.get(d.answer, 0) + 1
        return out

    def annotation_for(self, query_id: str) -> Annotation | None:
        row = self._retrying(
            "reading a stored annotation",
            lambda: self._db.execute(
                "SELECT answer, samples, votes, agreement, accepted, teacher, usage, seconds FROM icd_annotations "
                "WHERE owner = %s AND query_id = %s",
                (self.owner, query_id),
            ).fetchone(),
        )
        return _annotation(row) if row is not None else None

    def demo_like(self, query: Query) -> Demo | None:
        if query.image is None:
            return None
        row = self._retrying(
            "looking for a pooled demo",
            lambda: self._db.execute(
                "SELECT id FROM icd_annotations WHERE in_pool AND image_digest = %s AND prompt = %s "
                "AND NOT (owner = %s AND query_id = %s)",
                (image_digest(query.image), query.prompt, self.owner, query.id),
            ).fetchone(),
        )
        if row is None:
            return None
        self.refresh()
        return self._demos.get(row[0])

    def stats(self) -> dict[str, int]:
        rows = self._retrying(
            "reading the pool's counts",
            lambda: self._db.execute("SELECT status, COUNT(*) FROM icd_annotations GROUP BY status").fetchall(),
        )
        out = {k: 0 for k in ("added", "rejected", "duplicate", "evicted")}
        out.update({k: int(v) for k, v in rows})
        out["pool_size"] = len(self)
        return out

    def ledger_state(self) -> dict[str, Any]:
        row = self._retrying(
            "reading the ledger",
            lambda: self._db.execute(
                "SELECT calls, cost_usd, max_calls, max_cost_usd, dearest_call_usd FROM icd_ledger WHERE name = %s",
                (self.ledger,),
            ).fetchone(),
        )
        return {
            "calls": int(row[0]),
            "cost_usd": float(row[1]),
            "max_calls": row[2],
            "max_cost_usd": row[3],
            "dearest_call_usd": float(row[4]),
        }

    # ------------------------------------------------------------------ buying a label
    def claim(self, query: Query) -> ClaimResult:
        """Before calling the teacher: "claimed" (go ahead, one call charged to the global ledger),
        "pooled" (another worker's demo of this image+prompt exists: reuse it), "busy" (another
        worker is buying it now), "budget" (the ledger's cap is reached). Leases are on the
        database's clock."""
        return self._retrying("claiming an item", lambda: self._claim_once(query))

    def _claim_once(self, query: Query) -> ClaimResult:
        if query.image is None:
            # nothing to buy once, but its call in flight must be a claim too: the other workers'
            # dollar checks reserve a call for each claim
            with self._db.transaction():
                self._db.execute(
                    "INSERT INTO icd_claims (image_digest, prompt, query_id, worker, expires) "
                    f"VALUES (%s, %s, %s, %s, {DB_NOW} + %s) "
                    "ON CONFLICT (image_digest, prompt) DO UPDATE SET expires = EXCLUDED.expires",
                    (self._text_claim(query), query.prompt, query.id, self.worker, self.lease_s),
                )
                if not self._charge():
                    self._release_text(query)
                    return "budget"
            return "claimed"
        digest = image_digest(query.image)
        with self._db.transaction():
            pooled = self._db.execute(
                "SELECT 1 FROM icd_annotations WHERE in_pool AND image_digest = %s AND prompt = %s",
                (digest, query.prompt),
            ).fetchone()
            if pooled is not None:
                return "pooled"
            got = self._db.execute(
                "INSERT INTO icd_claims (image_digest, prompt, query_id, worker, expires) "
                f"VALUES (%s, %s, %s, %s, {DB_NOW} + %s) "
                "ON CONFLICT (image_digest, prompt) DO UPDATE SET query_id = EXCLUDED.query_id, "
                "worker = EXCLUDED.worker, expires = EXCLUDED.expires "
                # this worker may take its own claim again for the same query only: a service
                # answers concurrent queries, and a twin of one in flight must wait for its label
                f"WHERE icd_claims.expires < {DB_NOW} OR (icd_claims.worker = EXCLUDED.worker "
                "AND icd_claims.query_id = EXCLUDED.query_id) RETURNING 1",
                (digest, query.prompt, query.id, self.worker, self.lease_s),
            ).fetchone()
            if got is None:
                return "busy"
            # the claimant may have committed its demo (deleting its claim) between our first look
            # and our insert: each statement sees the latest commits, so look again before buying
            pooled = self._db.execute(
                "SELECT 1 FROM icd_annotations WHERE in_pool AND image_digest = %s AND prompt = %s",
                (digest, query.prompt),
            ).fetchone()
            if pooled is not None:
                self._delete_claim(digest, query.prompt, " AND worker = %s", (self.worker,))
                return "pooled"
            if not self._charge():
                self._delete_claim(digest, query.prompt)
                return "budget"
        return "claimed"

    def _charge(self) -> bool:
        """One call on the global ledger, if its caps allow it; the caller holds the call's claim. A
        call's cost is known only after it, so the dollar cap reserves the dearest call any worker has
        paid (as ``CappedGate`` does for one process) for every call in flight, this one included:
        each live claim."""
        with self._db.transaction():
            # the ledger row first, then the claims, in a later statement: one UPDATE that waited on
            # the row counted the claims as of its start, missing those of the worker it waited for
            self._db.execute("SELECT 1 FROM icd_ledger WHERE name = %s FOR UPDATE", (self.ledger,))
            row = self._db.execute(
                "UPDATE icd_ledger SET calls = calls + 1 WHERE name = %s AND (max_calls IS NULL OR calls < max_calls) "
                "AND (max_cost_usd IS NULL OR cost_usd + dearest_call_usd * ("
                f"(SELECT COUNT(*) FROM icd_claims WHERE expires >= {DB_NOW})) <= max_cost_usd) RETURNING calls",
                (self.ledger,),
            ).fetchone()
        return row is not None

    def _delete_claim(self, key: str, prompt: str, where: str = "", params: tuple[Any, ...] = ()) -> None:
        """Delete a claim and wake the workers waiting on it (at commit)."""
        self._db.execute(
            f"DELETE FROM icd_claims WHERE image_digest = %s AND prompt = %s{where}", (key, prompt, *params)
        )
        self._db.execute("SELECT pg_notify(%s, %s)", (CLAIMS_CHANNEL, key))

    def _claim_key(self, query: Query) -> str:
        return image_digest(query.image) if query.image is not None else self._text_claim(query)

    def _text_claim(self, query: Query) -> str:
        """The claim key of a query without an image (in the image digest column: never a digest)."""
        return f"text:{self.worker}:{query.id}"

    def _release_text(self, query: Query) -> None:
        self._delete_claim(self._text_claim(query), query.prompt)

    def release(self, query: Query) -> None:
        """Give a claim back without a demo (the teacher failed): another worker may buy it."""
        if query.image is None:
            self._retrying("releasing a claim", lambda: self._release_text(query))
            return
        # only this query's claim: the same item may be claimed anew, by this worker, for another query
        self._retrying(
            "releasing a claim",
            lambda: self._delete_claim(
                image_digest(query.image), query.prompt, " AND worker = %s AND query_id = %s", (self.worker, query.id)
            ),
        )

    def take_over_claims(self) -> int:
        """Make the claims of this owner's earlier workers this worker's (the caller holds the owner's
        exclusive lock, so they are dead): their items are claimed again at once, by this worker only.
        Their text-only claims (a reservation for a call in flight, keyed by worker) are dropped: that
        call is over. Returns how many image claims were taken over."""
        if not self.owner:
            return 0
        prefix = f"{self.owner}|"
        mine = "left(worker, length(%s)) = %s AND worker <> %s"

        def take() -> int:
            with self._db.transaction():
                self._db.execute(
                    f"DELETE FROM icd_claims WHERE {mine} AND image_digest LIKE 'text:%%'",
                    (prefix, prefix, self.worker),
                )
                return int(
                    self._db.execute(
                        f"UPDATE icd_claims SET worker = %s, expires = {DB_NOW} + %s WHERE {mine}",
                        (self.worker, self.lease_s, prefix, prefix, self.worker),
                    ).rowcount
                )

        return self._retrying("taking over claims", take)

    def wait_for_claim(self, query: Query, timeout: float) -> None:
        """Wait, by LISTEN, until the claim on ``query``'s item is deleted (its demo committed, or it
        was released) or ``timeout`` passes; the caller then claims again. No polling: one worker
        waiting costs the database nothing."""
        key = self._claim_key(query)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            # short slices: the listener also serves other threads (images, heartbeats, refreshes)
            if self._on_listener("waiting for a claim", lambda c: self._drain(c, min(left, 0.5), key)):
                return

    # ------------------------------------------------------------------ writing
    def add(
        self, query: Query, annotation: Annotation, embeddings: Embeddings
    ) -> tuple[Demo | None, AddStatus]:
        """Store an annotation (always) and pool it (when accepted and new), release the claim and
        announce it: one transaction, so a killed worker leaves all of it or none."""
        errors = self._psycopg.errors
        digest = image_digest(query.image) if query.image is not None else None
        status: AddStatus = "added" if annotation.accepted else "rejected"

        def write() -> tuple[Demo | None, AddStatus] | _Written:
            # retried whole after a lost connection: a commit that did land is found by its query id
            with self._db.transaction():
                return self._add_once(query, annotation, embeddings, digest, status)

        for _attempt in range(2):
            try:
                done = self._retrying("writing to the pool", write)
            except errors.UniqueViolation as e:
                if e.diag.constraint_name != "icd_one_demo_per_item":
                    break  # this owner's query id is stored already
                status = "duplicate"  # a twin was pooled by another worker between our check and insert
                continue
            except self._psycopg.Error as e:
                raise ICDError(f"could not write to pool {_redact(self.url)}: {_first_line(e)}") from e
            if isinstance(done, tuple):
                return done
            # committed: our copy follows (the notification reaches the other workers)
            demo_id, in_pool, evicted, status = done.demo_id, done.in_pool, done.evicted, done.status
            return self._apply_own(query, annotation, embeddings, demo_id, in_pool, evicted), status
        existing = self._retrying(
            "reading a stored annotation",
            lambda: self._db.execute(
                "SELECT id FROM icd_annotations WHERE owner = %s AND query_id = %s", (self.owner, query.id)
            ).fetchone(),
        )
        self.refresh()
        return (self._demos.get(existing[0]) if existing else None), "exists"

    def _add_once(
        self,
        query: Query,
        annotation: Annotation,
        embeddings: Embeddings,
        digest: str | None,
        status: AddStatus,
    ) -> tuple[Demo | None, AddStatus] | _Written:
        existing = self._db.execute(
            "SELECT id FROM icd_annotations WHERE owner = %s AND query_id = %s", (self.owner, query.id)
        ).fetchone()
        if existing is not None:
            self.refresh()
            return self._demos.get(existing[0]), "exists"
        if status == "added" and digest is not None:
            dup = self._db.execute(
                "SELECT id FROM icd_annotations WHERE in_pool AND image_digest = %s AND prompt = %s",
                (digest, query.prompt),
            ).fetchone()
            if dup is not None:
                status = "duplicate"
        in_pool = status == "added"
        u = annotation.usage
        demo_id = self._db.execute(
            "INSERT INTO icd_annotations (owner, query_id, position, image_png, image_ref, image_digest, prompt, options, "
            "answer, accepted, in_pool, status, teacher, samples, votes, agreement, usage, seconds, created, worker) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (
                self.owner,
                query.id,
                query.position,
                image_to_png(query.image) if query.image is not None else None,
                query.image_ref,
                digest,
                query.prompt,
                json.dumps(list(query.options)) if query.options else None,
                annotation.answer,
                annotation.accepted,
                in_pool,
                status,
                annotation.teacher,
                json.dumps(annotation.samples),
                json.dumps(annotation.votes),
                annotation.agreement,
                json.dumps(asdict(u)),  # Usage fields, in order
                annotation.seconds,
                time.time(),
                self.worker,
            ),
        ).fetchone()[0]
        if u.cost_usd:
            self._db.execute(
                "UPDATE icd_ledger SET cost_usd = cost_usd + %s, dearest_call_usd = GREATEST(dearest_call_usd, %s) "
                "WHERE name = %s",
                (u.cost_usd, u.cost_usd, self.ledger),
            )
        evicted: list[int] = []
        if in_pool:
            with self._db.cursor() as cur:
                cur.executemany(
                    "INSERT INTO icd_embeddings (demo_id, key, vec) VALUES (%s, %s, %s)",
                    [(demo_id, k, _unit(v).tobytes()) for k, v in embeddings.items()],
                )
            evicted = self._evict_for_one_more(demo_id)
        if digest is not None:
            self._delete_claim(digest, query.prompt)
        else:
            self._release_text(query)
        payload = ",".join([str(demo_id)] * in_pool + [f"-{i}" for i in evicted])
        if payload:
            self._db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
        return _Written(int(demo_id), in_pool, evicted, status)

    def _apply_own(
        self,
        query: Query,
        annotation: Annotation,
        embeddings: Embeddings,
        demo_id: int,
        in_pool: bool,
        evicted: list[int],
    ) -> Demo | None:
        for old in evicted:
            if self._demos.pop(old, None) is not None:
                self._index.remove(old)
                self._kinds.remove(old)
        if not in_pool:
            return None
        demo = pooled_demo(demo_id, query, annotation, embeddings, self.images)
        self._demos[demo_id] = demo
        self._index.add(demo_id, demo.embeddings)
        demo.embeddings = self._index.embeddings_of(demo_id)  # the index holds the one copy
        self._kinds.add(demo_id, demo.provenance.get("options"))
        return demo

    def _evict_for_one_more(self, new_id: int) -> list[int]:
        if self.max_size is None:
            return []
        # one evictor at a time across workers, so two do not both evict for the same slot
        self._db.execute("SELECT pg_advisory_xact_lock(7414222)")
        n = self._db.execute("SELECT COUNT(*) FROM icd_annotations WHERE in_pool").fetchone()[0]
        if n <= self.max_size:
            return []
        rows = self._db.execute(
            "UPDATE icd_annotations SET in_pool = false, status = 'evicted' WHERE id IN "
            "(SELECT id FROM icd_annotations WHERE in_pool AND id <> %s ORDER BY id LIMIT %s) RETURNING id",
            (new_id, n - self.max_size),
        ).fetchall()
        return [int(r[0]) for r in rows]

    def remove(self, demo_id: int) -> bool:
        """Take a demo out of the pool for every worker; its annotation stays, status 'deleted'."""

        def take_out() -> Any:
            with self._db.transaction():
                row = self._db.execute(
                    "UPDATE icd_annotations SET in_pool = false, status = 'deleted' WHERE id = %s AND in_pool RETURNING id",
                    (demo_id,),
                ).fetchone()
                if row is not None:
                    self._db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"-{demo_id}"))
            return row

        row = self._retrying("removing a demo", take_out)
        self._apply([], [demo_id])
        return row is not None

    def renew_claims(self, query_ids: Sequence[str] | None = None) -> int:
        """Extend this worker's claims by ``lease_s`` (a heartbeat for teacher calls in flight), so a
        short lease still protects a long call while a dead worker's claims expire soon; only those
        of ``query_ids`` when given (a claim whose release failed lapses). Any thread: it runs on the
        listener, not on the work connection, so a worker busy elsewhere still renews on time."""
        sql, params = (
            f"UPDATE icd_claims SET expires = {DB_NOW} + %s WHERE worker = %s",
            [self.lease_s, self.worker],
        )
        if query_ids is not None:
            sql, params = sql + " AND query_id = ANY(%s)", [*params, list(query_ids)]
        return self._on_listener("renewing claims", lambda c: int(c.execute(sql, params).rowcount))

    def known_size(self) -> int:
        """The pool size as this worker last saw it, without a database round trip (any thread)."""
        return len(self._demos)

    def close(self) -> None:
        try:
            self._index.save()
        finally:
            self._close_connections()

    def _close_connections(self) -> None:
        self._closed = True
        if self._db is not None:
            self._db.close()
        with self._listen_lock:
            if self._listen is not None:
                self._listen.close()

    def __enter__(self) -> PostgresPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class _Written:
    demo_id: int
    in_pool: bool
    evicted: list[int]
    status: AddStatus


def _annotation(row: tuple[Any, ...]) -> Annotation:
    answer, samples, votes, agreement, accepted, teacher, usage, seconds = row
    return Annotation(
        answer=answer,
        samples=json.loads(samples or "[]"),
        votes=json.loads(votes or "{}"),
        agreement=agreement or 0.0,
        accepted=bool(accepted),
        teacher=teacher or "",
        usage=Usage(**json.loads(usage or "{}")),
        seconds=seconds or 0.0,
    )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _sleep(delay: float) -> float:
    """Sleep ``delay`` (a reconnection's backoff) and return the next one, doubled up to 2 s."""
    time.sleep(delay)
    return min(delay * 2, 2.0)


def _redact(url: str) -> str:
    """The URL without its password, for error messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    cred, host = rest.rsplit("@", 1)
    return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url


class ClaimingAnnotator:
    """Wraps an annotator (``TestTimeScaling``) so that workers sharing a ``PostgresPool`` buy each
    image+prompt once, within one global budget.

    ``annotate`` claims the item first. Claimed: the teacher is called (a failure releases the claim).
    Already pooled, or bought by another worker meanwhile (waits up to the claim lease, by LISTEN: the
    claim's deletion wakes it, and ``recheck_s`` bounds a wait whose wake-up was lost or whose claimant
    died): that demo's answer is returned at no cost, marked as reused (a pool hit: nothing stored, no
    call counted). Ledger cap reached: ``NotCalled`` (a ``TeacherError`` the Distiller counts as no call).
    """

    def __init__(self, inner: Any, pool: PostgresPool, recheck_s: float = 5.0) -> None:
        self.inner = inner
        self.pool = pool
        self.recheck_s = recheck_s

    def annotate(self, query: Query) -> Annotation:
        deadline = time.monotonic() + self.pool.lease_s + 1.0
        while True:
            state = self.pool.claim(query)
            if state == "claimed":
                try:
                    with _renewing(self.pool):
                        return self.inner.annotate(query)
                except BaseException:
                    self.pool.release(query)
                    raise
            if state == "budget":
                raise NotCalled("the shared pool's teacher budget is spent (ledger cap reached)")
            wait = self.recheck_s
            if state == "pooled":
                twin = self.pool.demo_like(query)
                if twin is not None:
                    return reused_annotation(twin)
                wait = 0.05  # pooled a moment ago and gone again (evicted): look once more soon
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotCalled("another worker holds the claim on this image and prompt; gave up waiting")
            self.pool.wait_for_claim(query, min(wait, left))


@contextlib.contextmanager
def _renewing(pool: PostgresPool) -> Iterator[None]:
    """Renew the pool's claims every third of a lease while the block runs: a teacher call slower
    than the lease (test-time scaling, retries) must not let another worker buy the same label."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(pool.lease_s / 3):
            try:
                pool.renew_claims()
            except Exception as e:  # the database is briefly away: the next beat tries again
                log.warning("could not renew the pool's claims: %s", _first_line(e))

    t = threading.Thread(target=beat, name="icd-claim-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


class NotCalled(TeacherError):
    """The teacher was not called for this query (the shared budget is spent, or another worker held
    the claim too long): no answer, but neither a teacher failure nor a call of this worker's."""

    not_called = True


@dataclass
class ReusedAnnotation(Annotation):
    """A label another worker bought (``reused_demo`` is its demo): no teacher call, no cost, and
    nothing new for the pool. The Distiller counts it as a pool hit, not as a teacher call."""

    reused_demo: int | None = None


def reused_annotation(demo: Demo) -> ReusedAnnotation:
    votes = demo.provenance.get("votes") or {demo.answer: 1}
    return ReusedAnnotation(
        answer=demo.answer,
        samples=[demo.answer],
        votes=votes,
        agreement=float(demo.provenance.get("agreement") or 1.0),
        accepted=True,
        teacher=f"{demo.provenance.get('teacher') or ''} (demo {demo.id}, bought by another worker)",
        usage=Usage(),
        reused_demo=demo.id,
    )
