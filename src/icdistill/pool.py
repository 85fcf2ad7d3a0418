"""The demonstration pool: every teacher annotation in a SQLite file (WAL), with an in-memory vector index.

Each annotation is committed in its own transaction before the loop moves on, so a killed run loses
no accepted annotation; the index is rebuilt from the file on open.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np

from icdistill.index import IndexConfig, VectorIndex
from icdistill.runlog import FolderLock
from icdistill.types import (
    Annotation,
    Demo,
    Embeddings,
    ICDError,
    Query,
    Usage,
    image_digest,
    image_to_png,
    png_to_image,
)

AddStatus = Literal["added", "rejected", "duplicate", "exists"]

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


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


class IndexedEmbeddings(Mapping[str, np.ndarray]):
    """A pooled demo's vectors, read from the pool's index when asked for: every vector lives once, in
    the index (a per-demo copy beside it doubled the memory of a 1M-demo pool)."""

    __slots__ = ("_by_key", "_id")

    def __init__(self, by_key: dict[str, VectorIndex], demo_id: int) -> None:
        self._by_key = by_key
        self._id = demo_id

    def __getitem__(self, key: str) -> np.ndarray:
        index = self._by_key.get(key)
        if index is None or self._id not in index:
            raise KeyError(key)
        return index.vector(self._id)

    def __iter__(self) -> Iterator[str]:
        return iter([k for k, index in self._by_key.items() if self._id in index])

    def __len__(self) -> int:
        return sum(1 for index in self._by_key.values() if self._id in index)

    def __repr__(self) -> str:
        return f"IndexedEmbeddings(demo {self._id}: {list(self)})"


class _Index:
    """One ``VectorIndex`` per embedding key (exact while small, HNSW beyond; see icdistill.index),
    saved beside the pool file and reconciled with it on open."""

    def __init__(self, folder: Path | None, config: IndexConfig | None) -> None:
        self._folder = folder
        self._config = config or IndexConfig()
        self._by_key: dict[str, VectorIndex] = {}
        self._dirty: set[str] = set()
        self.opened: dict[str, str] = {}  # key -> "loaded", "loaded+N" or "built (...)"

    def _path(self, key: str) -> Path | None:
        return self._folder / f"{key}.usearch" if self._folder is not None else None

    def embeddings_of(self, demo_id: int) -> IndexedEmbeddings:
        return IndexedEmbeddings(self._by_key, demo_id)

    def load(self, key: str, ids: list[int], vecs: np.ndarray) -> None:
        path = self._path(key)
        if path is None:
            self._by_key[key] = VectorIndex(vecs.shape[1], self._config)
            self._by_key[key].add(ids, vecs)
            return
        self._by_key[key], self.opened[key] = VectorIndex.load(path, np.asarray(ids), vecs, self._config)
        if self.opened[key] != "loaded":
            self._dirty.add(key)

    def add(self, demo_id: int, embeddings: Embeddings) -> None:
        for key, vec in embeddings.items():
            index = self._by_key.get(key)
            v = np.asarray(vec, dtype=np.float32).ravel()  # normalised once, in VectorIndex.add
            if index is None or index.ndim != v.shape[0]:
                if index is not None and len(index):
                    raise ICDError(f"embedding {key!r} has dimension {v.shape[0]}, pool has {index.ndim}")
                index = self._by_key[key] = VectorIndex(v.shape[0], self._config)
            index.add([demo_id], v[None])
            self._dirty.add(key)

    def remove(self, demo_id: int) -> None:
        for key, index in self._by_key.items():
            if demo_id in index:
                index.remove([demo_id])
                self._dirty.add(key)

    def get(self, key: str) -> tuple[list[int], np.ndarray]:
        index = self._by_key.get(key)
        if index is None or not len(index):
            return [], np.zeros((0, 0), dtype=np.float32)
        ids, mat = index.matrix()
        return ids.tolist(), mat

    def search(
        self, key: str, vec: np.ndarray, k: int, candidates: Any = None, keep_ties: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        index = self._by_key.get(key)
        if index is None or not len(index):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        return index.search(vec, k, candidates, keep_ties)

    def save(self) -> None:
        """Persist changed graphs. Best effort: a stale or missing file only costs a catch-up on open."""
        for key in sorted(self._dirty):
            path = self._path(key)
            index = self._by_key.get(key)
            if path is not None and index is not None and len(index):
                index.save(path)
        self._dirty.clear()


KindKey = tuple[str, ...] | None


def kind_key(options: Any) -> KindKey:
    """The kind of question a demo or query answers: its option set, or None for open answers."""
    return tuple(options) if options else None


class _Kinds:
    """Pooled demo ids per kind of question, so that selectors need not scan the pool for them."""

    def __init__(self) -> None:
        self._ids: dict[KindKey, dict[int, None]] = {}
        self._kind_of: dict[int, KindKey] = {}
        self._arrays: dict[KindKey, np.ndarray] = {}

    def add(self, demo_id: int, options: Any) -> None:
        key = kind_key(options)
        self._ids.setdefault(key, {})[demo_id] = None
        self._kind_of[demo_id] = key
        self._arrays.pop(key, None)

    def remove(self, demo_id: int) -> None:
        key = self._kind_of.pop(demo_id, None)
        if demo_id in self._ids.get(key, {}):
            del self._ids[key][demo_id]
            self._arrays.pop(key, None)

    def ids(self, options: Any) -> np.ndarray | None:
        """Ascending ids of that kind; None when every pooled demo is of it (no restriction)."""
        key = kind_key(options)
        members = self._ids.get(key, {})
        if len(members) == len(self._kind_of):
            return None
        arr = self._arrays.get(key)
        if arr is None:
            arr = self._arrays[key] = np.sort(np.fromiter(members, dtype=np.int64, count=len(members)))
            arr.setflags(write=False)
        return arr


def pooled_demo(demo_id: int, query: Query, annotation: Annotation, embeddings: Embeddings) -> Demo:
    """The demonstration a pooled annotation becomes, with its provenance (every pool backend)."""
    return Demo(
        id=demo_id,
        query_id=query.id,
        image=query.image,
        prompt=query.prompt,
        answer=annotation.answer,
        embeddings={k: _unit(v) for k, v in embeddings.items()},
        provenance={
            "teacher": annotation.teacher,
            "votes": annotation.votes,
            "agreement": annotation.agreement,
            "position": query.position,
            "image_ref": query.image_ref,
            "options": list(query.options) if query.options else None,
        },
    )


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
            self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise ICDError(f"cannot open pool {self.path}: {e}") from e
        if check != "ok":
            raise ICDError(f"pool {self.path} is corrupt: {check}")
        self._demos: dict[int, Demo] = {}
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
            ids = np.empty(count, dtype=np.int64)
            mat: np.ndarray | None = None
            n = 0
            for demo_id, blob in self._db.execute(
                f"SELECT e.demo_id, e.vec {pooled} AND e.key = ? ORDER BY e.demo_id", (key,)
            ):
                row = np.frombuffer(blob, dtype=np.float32)
                if mat is None:
                    mat = np.empty((count, row.shape[0]), dtype=np.float32)
                if n < count:  # rows added between the count and this read are caught up on the next open
                    ids[n], mat[n] = demo_id, row
                    n += 1
            if mat is not None and n:
                self._index.load(key, ids[:n].tolist(), mat[:n])
            del mat
        for row in self._db.execute(
            "SELECT id, query_id, position, image_png, image_ref, prompt, answer, teacher, votes, agreement, options "
            "FROM annotations WHERE in_pool = 1 ORDER BY id"
        ):
            demo = self._row_to_demo(row, self._index.embeddings_of(row[0]))
            self._demos[demo.id] = demo
            self._kinds.add(demo.id, demo.provenance.get("options"))

    @staticmethod
    def _row_to_demo(row: tuple[Any, ...], embeddings: Mapping[str, np.ndarray]) -> Demo:
        demo_id, query_id, position, png, image_ref, prompt, answer, teacher, votes, agreement, options = row
        return Demo(
            id=demo_id,
            query_id=query_id,
            image=png_to_image(png) if png is not None else None,
            prompt=prompt,
            answer=answer,
            embeddings=embeddings,
            provenance={
                "teacher": teacher,
                "votes": json.loads(votes) if votes else {},
                "agreement": agreement,
                "position": position,
                "image_ref": image_ref,
                "options": json.loads(options) if options else None,
            },
        )

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
        older first; within ``candidates`` when given. See ``icdistill.index.VectorIndex.search``."""
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
        demo = pooled_demo(demo_id, query, annotation, embeddings)
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
        self._index.save()
        self._db.close()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> SQLitePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
