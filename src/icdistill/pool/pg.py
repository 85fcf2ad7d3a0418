"""A demonstration pool shared by many workers: PostgreSQL holds the truth, each worker an index.

PostgreSQL holds the annotations (images, embeddings, answers), the labelling queue (``icd_claims``:
which image+prompt a worker is buying right now) and the budget ledger (``icd_ledger``). Every
worker keeps its own in-memory copy of the pooled demos and a ``VectorIndex`` per key, kept in sync
by LISTEN/NOTIFY: a demo committed by one worker is announced at commit, and the others pick it up
on their next read (``refresh``), so a new demo is visible within one query. With ``shared_index``
the workers of one host map one saved snapshot of the index instead of each holding a copy
(``icdistill.pool.shared_index``).

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

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icdistill.errors import ICDError
from icdistill.pool.demo_index import _Index, _Kinds
from icdistill.pool.demos import (
    AddStatus,
    DemoImages,
    _unit,
    pooled_demo,
)
from icdistill.pool.index import IndexConfig
from icdistill.pool.index_snapshot import SharedIndexConfig, SnapshotStore, pool_identity
from icdistill.pool.pg_claims import _Claims
from icdistill.pool.pg_connection import _Connections, _first_line, _redact
from icdistill.pool.pg_ledger import _Ledger
from icdistill.pool.pg_notify import _Notifications
from icdistill.pool.pg_schema import _SCHEMA, CHANNEL
from icdistill.pool.shared_index import SharedIndexes
from icdistill.types import Annotation, Demo, Embeddings, Query, Usage, image_digest, image_to_png

# a session-mode URL for the listener when the pool's URL goes through a transaction-mode PgBouncer
LISTEN_URL_ENV = "ICD_POOL_LISTEN_URL"


def is_postgres_url(spec: str | os.PathLike[str] | None) -> bool:
    return isinstance(spec, str) and spec.startswith(("postgresql://", "postgres://"))


class PostgresPool(_Connections, _Notifications, _Ledger, _Claims):
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
    ``shared_index``: map this host's snapshot of the pool's index instead of holding a copy
    (``icdistill.pool.shared_index``; ``index_dir`` is then unused). ``listen_url``: the listener's own URL
    (a session-mode connection), when ``url`` goes through a transaction-mode PgBouncer.
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
        shared_index: SharedIndexConfig | None = None,
        listen_url: str | None = None,
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
        # a separate session-mode URL for the listener (LISTEN, images, claims)
        self.listen_url = listen_url or url
        self.shared_index = shared_index
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
        if listen_url:
            # the work connection goes through a transaction-mode pooler: no server-side prepared
            # statements (a transaction's backend is not the next one's)
            self._connect_kwargs["prepare_threshold"] = None
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
            self._listen = self._connect(self.listen_url)
            if self.listen_url:
                self._check_same_database()
        except psycopg.Error as e:
            self._close_connections()
            raise ICDError(f"cannot connect to pool {_redact(url)}: {e}") from e
        except ICDError:
            self._close_connections()
            raise
        try:
            self._open(ledger, max_calls, max_cost_usd, index, index_dir)
            if take_over:
                self.take_over_claims()
        except BaseException as e:
            self._close_connections()  # a half-opened pool holds no backends
            if isinstance(e, psycopg.Error):
                raise ICDError(f"cannot open pool {_redact(url)}: {e}") from e
            raise

    def _connect(self, url: str | None = None) -> Any:
        return self._psycopg.connect(url or self.url, **self._connect_kwargs)

    def _check_same_database(self) -> None:
        """The listener (``listen_url``) also reads images and renews claims: it must reach the very
        database of the pool's URL (same name, oid and server start), or notifications, images and
        claims would silently come from another one."""
        sql = (
            "SELECT current_database(), (SELECT oid FROM pg_database WHERE datname = current_database())::text, "
            "pg_postmaster_start_time()::text"
        )
        work, listen = (tuple(c.execute(sql).fetchone()) for c in (self._db, self._listen))
        if work != listen:
            raise ICDError(
                f"{LISTEN_URL_ENV} reaches another database than the pool's URL {_redact(self.url)} "
                f"(database {listen[0]!r} against {work[0]!r}): point it at the same database"
            )

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
        self._index: _Index = _Index(Path(index_dir) if index_dir is not None else None, index)
        self._own_index = self._index  # without a usable snapshot folder: this worker's own copy
        if self.shared_index is not None:  # this host's shared snapshots
            store = SnapshotStore(self.shared_index.root / pool_identity(self._db))
            self._index = SharedIndexes(store, index, self.shared_index)
        self._kinds = _Kinds()
        self._load()

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
            own = self._apply_own(query, annotation, embeddings, demo_id, in_pool, evicted)
            self._roll_index()
            return own, status
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


