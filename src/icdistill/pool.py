"""The demonstration pool: every teacher annotation in a SQLite file (WAL), with an in-memory vector index.

Each annotation is committed in its own transaction before the loop moves on, so a killed run loses
no accepted annotation; the index is rebuilt from the file on open.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from icdistill.image_cache import ImageCache
from icdistill.index import IndexConfig, VectorIndex, spare_rows
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


# Pooled demos' images are decoded on use and kept in a bounded LRU: decoding every demo's image at
# open would hold a pool of a million photos in memory.
DEMO_IMAGE_CACHE_ITEMS = 4096
DEMO_IMAGE_CACHE_BYTES = 256 * 1024 * 1024


class DemoImages:
    """The images of a pool's demos: stored in its database, decoded when a demo's ``image`` is read,
    kept in a bounded LRU. ``fetch`` returns a demo's encoded image (None when it has none); it may be
    called from any thread."""

    def __init__(
        self,
        fetch: Callable[[int], bytes | None],
        where: str,
        max_items: int = DEMO_IMAGE_CACHE_ITEMS,
        max_bytes: int = DEMO_IMAGE_CACHE_BYTES,
    ) -> None:
        self._fetch = fetch
        self._where = where
        self._lock = threading.Lock()
        self.cache = ImageCache(max_items, max_bytes)
        self.decoded = 0  # images read back from the database (cache misses)

    def put(self, demo_id: int, image: Image.Image) -> None:
        self.cache.put(demo_id, image)

    def get(self, demo_id: int) -> Image.Image | None:
        image = self.cache.get(demo_id)
        if image is not None:
            return image
        with self._lock:
            try:
                data = self._fetch(demo_id)
            except Exception as e:  # a closed pool, a lost connection: say which demo and where
                raise ICDError(f"cannot read the image of demo {demo_id} from {self._where}: {e}") from e
        if data is None:
            return None
        try:
            image = png_to_image(data)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for a corrupt file
            raise ICDError(f"the image of demo {demo_id} in {self._where} is corrupt: {e}") from e
        self.decoded += 1
        self.cache.put(demo_id, image)
        return image


class StoredDemo(Demo):
    """A pooled demo whose image stays in the pool's database until it is read (``DemoImages``).

    It behaves as a ``Demo``; a copy or a pickle of it is a plain ``Demo`` holding the decoded image."""

    def __init__(self, images: DemoImages, has_image: bool, **fields: Any) -> None:
        self._images = images
        self._has_image = has_image
        super().__init__(image=None, **fields)

    @property  # type: ignore[override]
    def image(self) -> Image.Image | None:
        return self._images.get(self.id) if self._has_image else None

    @image.setter
    def image(self, value: Image.Image | None) -> None:
        if value is not None:
            raise AttributeError("a pooled demo's image is read from its pool")

    def __repr__(self) -> str:
        # not the dataclass repr: it read the image from the pool (and raised once it was closed)
        image = "<in the pool>" if self._has_image else None
        return (
            f"StoredDemo(id={self.id!r}, query_id={self.query_id!r}, image={image}, prompt={self.prompt!r}, "
            f"answer={self.answer!r}, embeddings={self.embeddings!r}, provenance={self.provenance!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        fields = (self.id, self.query_id, self.image, self.prompt, self.answer)
        return (Demo, (*fields, dict(self.embeddings), dict(self.provenance)))


def read_vectors(rows: Iterable[tuple[int, bytes]], count: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``count`` stored (id, float32 bytes) rows, streamed into one matrix with spare rows that the
    index adopts (see ``spare_rows``); None when there are no rows. Rows past ``count`` (added after
    it was taken) are left to the next open's catch-up."""
    ids = np.empty(count, dtype=np.int64)
    mat: np.ndarray | None = None
    n = 0
    for demo_id, blob in rows:
        if n == count:
            break
        row = np.frombuffer(blob, dtype=np.float32)
        if mat is None:
            mat = np.empty((count + spare_rows(count), row.shape[0]), dtype=np.float32)
        ids[n], mat[n] = demo_id, row
        n += 1
    return ids[:n], mat


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

    def load(self, key: str, ids: np.ndarray, buffer: np.ndarray) -> None:
        """The index of ``key`` over ``ids``; it adopts ``buffer`` (their vectors, then spare rows)."""
        path = self._path(key)
        if path is None:
            self._by_key[key] = VectorIndex.build(ids, buffer, self._config)
            return
        self._by_key[key], self.opened[key] = VectorIndex.load(path, ids, buffer, self._config, adopt=True)
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


def pooled_demo(
    demo_id: int, query: Query, annotation: Annotation, embeddings: Embeddings, images: DemoImages
) -> Demo:
    """The demonstration a pooled annotation becomes, with its provenance (every pool backend); its
    image goes to the pool's image cache, not into the demo."""
    if query.image is not None:
        images.put(demo_id, query.image)
    return StoredDemo(
        images,
        query.image is not None,
        id=demo_id,
        query_id=query.id,
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


SHARED_VALUES_MAX = 65536  # distinct values kept in a pool's ``shared`` before it starts afresh


def stored_demo(
    row: tuple[Any, ...], embeddings: Mapping[str, np.ndarray], images: DemoImages, shared: dict[Any, Any]
) -> Demo:
    """A pooled demo from its database row (``DEMO_COLUMNS``, every pool backend).

    Values many demos repeat (prompt, answer, teacher, option list, votes) are one object each, kept
    in ``shared``: parsed per demo they were a third of a 1M-demo pool's Python memory. A demo's
    provenance is read-only."""
    demo_id, query_id, position, has_image, image_ref, prompt, answer, teacher, votes, agreement, options = (
        row
    )
    if len(shared) >= SHARED_VALUES_MAX:
        # values of demos long evicted stay here otherwise: a worker that reads every other worker's
        # demos, each with its own prompt, grew it for as long as it ran
        shared.clear()
    return StoredDemo(
        images,
        bool(has_image),
        id=demo_id,
        query_id=query_id,
        prompt=_one(shared, prompt),
        answer=_one(shared, answer),
        embeddings=embeddings,
        provenance={
            "teacher": _one(shared, teacher),
            "votes": _parsed(shared, votes, {}),
            "agreement": agreement,
            "position": position,
            "image_ref": image_ref,
            "options": _parsed(shared, options, None),
        },
    )


def _one(shared: dict[Any, Any], value: Any) -> Any:
    return shared.setdefault(value, value) if isinstance(value, str) else value


def _parsed(shared: dict[Any, Any], raw: str | None, empty: Any) -> Any:
    if not raw:
        return empty
    key = ("json", raw)
    value = shared.get(key)
    if value is None:
        value = shared[key] = json.loads(raw)
    return value


# the columns of a pooled demo's row, without its image (read on use)
DEMO_COLUMNS = "id, query_id, position, image_png IS NOT NULL, image_ref, prompt, answer, teacher, votes, agreement, options"


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
