"""The demonstration pool: every teacher annotation in a SQLite file (WAL), with an in-memory vector index.

Each annotation is committed in its own transaction before the loop moves on, so a killed run loses
no accepted annotation; the index is rebuilt from the file on open.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from icdistill.errors import ICDError
from icdistill.pool.demo_index import _Index, _Kinds
from icdistill.pool.demos import (
    DEMO_COLUMNS,
    AddStatus,
    DemoImages,
    _unit,
    pooled_demo,
    read_vectors,
    stored_demo,
)
from icdistill.pool.index import IndexConfig
from icdistill.runlog import FolderLock
from icdistill.types import (
    Annotation,
    Demo,
    Embeddings,
    Query,
    Usage,
    image_digest,
    image_to_png,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS annotations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    query_id TEXT NOT NULL UNIQUE,
    position INTEGER NOT NULL,
    image_png BLOB,
    image_ref TEXT,
    image_digest TEXT,
    prompt TEXT NOT NULL,
    options TEXT,
    answer TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    in_pool INTEGER NOT NULL,
    status TEXT NOT NULL,
    teacher TEXT,
    samples TEXT,
    votes TEXT,
    agreement REAL,
    usage TEXT,
    seconds REAL,
    created REAL
);
CREATE INDEX IF NOT EXISTS annotations_dedup ON annotations (image_digest, prompt) WHERE in_pool = 1;
CREATE TABLE IF NOT EXISTS embeddings (
    demo_id INTEGER NOT NULL REFERENCES annotations(id),
    key TEXT NOT NULL,
    vec BLOB NOT NULL,
    PRIMARY KEY (demo_id, key)
);
"""


class SQLitePool:
    """A crash-safe demonstration pool.

    ``path=None`` keeps it in memory (for experiments). ``max_size`` caps the number of demos in the
    pool by evicting the oldest (the annotation stays on disk, marked evicted). Accepted annotations
    of an image+prompt already in the pool are kept on disk but not indexed twice (dedup).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        max_size: int | None = None,
        index: IndexConfig | None = None,
        lock: bool = False,
    ) -> None:
        if max_size is not None and max_size < 1:
            raise ICDError("pool max size must be >= 1")
        self.path = Path(path) if path is not None else None
        self.max_size = max_size
        # ``lock``: one writer process per pool file (a run, a service); a second one gets a clear error
        self._lock = (
            FolderLock(f"{self.path}.lock", f"pool {self.path}").acquire() if lock and self.path else None
        )
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            # an in-memory database has one connection, which demos' images are also read through
            self._db = sqlite3.connect(
                str(self.path) if self.path else ":memory:",
                isolation_level=None,
                check_same_thread=self.path is not None,
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise ICDError(f"cannot open pool {self.path}: {e}") from e
        if check != "ok":
            raise ICDError(f"pool {self.path} is corrupt: {check}")
        self._demos: dict[int, Demo] = {}
        self._reader: sqlite3.Connection | None = None
        self._closed = False
        # the image reader's address, fixed now: a relative path read after a chdir names another file
        # (as_uri: "#", "?" and "%" in a folder name are URI syntax unless escaped)
        self._reader_uri = f"{self.path.resolve().as_uri()}?mode=ro" if self.path is not None else None
        self._shared: dict[Any, Any] = {}  # values many demos repeat (see stored_demo)
        self.images = DemoImages(self._fetch_image, f"pool {self.path or ':memory:'}")
        # the graphs live beside the file: rebuilding a large one takes minutes, so it is kept
        self._index = _Index(Path(f"{self.path}.index") if self.path is not None else None, index)
        self._kinds = _Kinds()
        self._load()

    # ------------------------------------------------------------------ reading
    def _load(self) -> None:
        # one key at a time, straight into one matrix: at 1M demos x 1280-d, per-demo arrays, a stacked
        # copy and the index's own matrix together did not fit in 24 GB (BENCHMARKS.md, section 7)
        pooled = "FROM embeddings e JOIN annotations a ON a.id = e.demo_id WHERE a.in_pool = 1"
        counts = self._db.execute(f"SELECT e.key, COUNT(*) {pooled} GROUP BY e.key ORDER BY e.key").fetchall()
        for key, count in counts:
            rows = self._db.execute(
                f"SELECT e.demo_id, e.vec {pooled} AND e.key = ? ORDER BY e.demo_id", (key,)
            )
            ids, mat = read_vectors(rows, count)
            if mat is not None:
                self._index.load(key, ids, mat)
            del mat
        for row in self._db.execute(f"SELECT {DEMO_COLUMNS} FROM annotations WHERE in_pool = 1 ORDER BY id"):
            demo = stored_demo(row, self._index.embeddings_of(row[0]), self.images, self._shared)
            self._demos[demo.id] = demo
            self._kinds.add(demo.id, demo.provenance.get("options"))

    def _fetch_image(self, demo_id: int) -> bytes | None:
        # demos' images are read on use, possibly from another thread than the pool's: a file pool
        # reads them through a connection of their own (an in-memory pool's is shared, see __init__)
        if self._closed:  # a reader opened now would never be closed
            raise ICDError("the pool is closed")
        if self._reader is None:
            self._reader = (
                sqlite3.connect(self._reader_uri, uri=True, check_same_thread=False)
                if self._reader_uri is not None
                else self._db
            )
        row = self._reader.execute("SELECT image_png FROM annotations WHERE id = ?", (demo_id,)).fetchone()
        if row is None:
            raise ICDError("no such annotation")
        return row[0]

    def __len__(self) -> int:
        return len(self._demos)

    def demos(self) -> list[Demo]:
        return list(self._demos.values())

    def get(self, demo_id: int) -> Demo:
        return self._demos[demo_id]

    def vectors(self, key: str) -> tuple[list[int], np.ndarray]:
        return self._index.get(key)

    def search(
        self,
        key: str,
        vector: np.ndarray,
        k: int,
        candidates: list[int] | np.ndarray | None = None,
        keep_ties: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ids (and cosines) of the ``k`` demos nearest to ``vector`` under ``key``, best first, ties
        older first; within ``candidates`` when given. See ``icdistill.pool.index.VectorIndex.search``."""
        return self._index.search(key, vector, k, candidates, keep_ties)

    def kind_ids(self, options: Any) -> np.ndarray | None:
        """Ascending ids of the pooled demos answering the kind of question of ``options`` (the same
        option set, or open answers); None when that is every pooled demo."""
        return self._kinds.ids(options)

    def index_status(self) -> dict[str, str]:
        """How each key's index was opened: "loaded", "loaded+N" (caught up with the file) or "built (why)"."""
        return dict(self._index.opened)

    def answers(self) -> dict[str, int]:
        """How many pooled demos carry each answer (label coverage)."""
        out: dict[str, int] = {}
        for d in self._demos.values():
            out[d.answer] = out.get(d.answer, 0) + 1
        return out

    def annotation_for(self, query_id: str) -> Annotation | None:
        """A stored annotation of this query (for resume: a write that landed before a crash)."""
        row = self._db.execute(
            "SELECT answer, samples, votes, agreement, accepted, teacher, usage, seconds FROM annotations WHERE query_id = ?",
            (query_id,),
        ).fetchone()
        if row is None:
            return None
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

    def demo_like(self, query: Query) -> Demo | None:
        """The pooled demo of the same image and prompt as ``query`` (another query id), if any: its
        annotation can be reused instead of paying the teacher again."""
        if query.image is None:
            return None
        row = self._db.execute(
            "SELECT id FROM annotations WHERE in_pool = 1 AND image_digest = ? AND prompt = ? AND query_id != ?",
            (image_digest(query.image), query.prompt, query.id),
        ).fetchone()
        return self._demos.get(row[0]) if row is not None else None

    def stats(self) -> dict[str, int]:
        rows = self._db.execute("SELECT status, COUNT(*) FROM annotations GROUP BY status").fetchall()
        out = {k: 0 for k in ("added", "rejected", "duplicate", "evicted")}
        out.update(dict(rows))
        out["pool_size"] = len(self)
        return out

    # ------------------------------------------------------------------ writing
    def add(
        self, query: Query, annotation: Annotation, embeddings: Embeddings
    ) -> tuple[Demo | None, AddStatus]:
        """Store an annotation (always) and index it as a demo (when accepted and new). One transaction."""
        existing = self._db.execute("SELECT id FROM annotations WHERE query_id = ?", (query.id,)).fetchone()
        if existing is not None:
            return self._demos.get(existing[0]), "exists"
        digest = image_digest(query.image) if query.image is not None else None
        status: AddStatus = "added" if annotation.accepted else "rejected"
        if status == "added" and digest is not None:
            dup = self._db.execute(
                "SELECT id FROM annotations WHERE in_pool = 1 AND image_digest = ? AND prompt = ?",
                (digest, query.prompt),
            ).fetchone()
            if dup is not None:
                status = "duplicate"
        in_pool = status == "added"
        u = annotation.usage
        try:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute(
                "INSERT INTO annotations (query_id, position, image_png, image_ref, image_digest, prompt, options, answer, "
                "accepted, in_pool, status, teacher, samples, votes, agreement, usage, seconds, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    query.id,
                    query.position,
                    image_to_png(query.image) if query.image is not None else None,
                    query.image_ref,
                    digest,
                    query.prompt,
                    json.dumps(list(query.options)) if query.options else None,
                    annotation.answer,
                    int(annotation.accepted),
                    int(in_pool),
                    status,
                    annotation.teacher,
                    json.dumps(annotation.samples),
                    json.dumps(annotation.votes),
                    annotation.agreement,
                    json.dumps(asdict(u)),  # Usage fields, in order
                    annotation.seconds,
                    time.time(),
                ),
            )
            demo_id = int(cur.lastrowid or 0)
            if in_pool:
                self._db.executemany(
                    "INSERT INTO embeddings (demo_id, key, vec) VALUES (?, ?, ?)",
                    [(demo_id, k, _unit(v).tobytes()) for k, v in embeddings.items()],
                )
            evicted = self._evict_for_one_more() if in_pool else []
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise ICDError(f"could not write to pool {self.path}: {e}") from e
        for old in evicted:
            self._demos.pop(old, None)
            self._kinds.remove(old)
            self._index.remove(old)
        if not in_pool:
            return None, status
        demo = pooled_demo(demo_id, query, annotation, embeddings, self.images)
        self._demos[demo_id] = demo
        self._kinds.add(demo_id, demo.provenance.get("options"))
        self._index.add(demo_id, demo.embeddings)
        demo.embeddings = self._index.embeddings_of(demo_id)  # the index holds the one copy
        return demo, status

    def _evict_for_one_more(self) -> list[int]:
        if self.max_size is None or len(self._demos) < self.max_size:
            return []
        n_out = len(self._demos) - self.max_size + 1
        oldest = sorted(self._demos)[:n_out]
        self._db.executemany(
            "UPDATE annotations SET in_pool = 0, status = 'evicted' WHERE id = ?", [(i,) for i in oldest]
        )
        return oldest

    def remove(self, demo_id: int) -> bool:
        """Take a demo out of the pool; its annotation stays on disk, status 'deleted'. False if not pooled."""
        if demo_id not in self._demos:
            return False
        try:
            self._db.execute(
                "UPDATE annotations SET in_pool = 0, status = 'deleted' WHERE id = ?", (demo_id,)
            )
        except sqlite3.Error as e:
            raise ICDError(f"could not write to pool {self.path}: {e}") from e
        self._demos.pop(demo_id)
        self._kinds.remove(demo_id)
        self._index.remove(demo_id)
        return True

    def close(self) -> None:
        self._closed = True
        self._index.save()
        if self._reader is not None and self._reader is not self._db:
            self._reader.close()
        self._db.close()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> SQLitePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
