"""One index per host for a shared pool's workers: a memory-mapped snapshot plus a small delta in RAM.

Every ``icd run`` worker of a PostgreSQL pool used to hold every pooled vector and its own HNSW graphs
(1.9 GB per worker at 100k demos, N workers N copies). Here the workers of one host map one saved
snapshot per embedding key (``icdistill.pool.index_snapshot``: vectors, group table and graph, read-only,
in the page cache once) and keep in RAM only what changed since it was written:

* ``MappedIndex``: a ``VectorIndex`` whose matrix, ids and graph are the snapshot's mapped files;
  removing a demo only marks it dead in this worker (its graph node stays, and is skipped);
* ``LayeredIndex``: the mapped snapshot beside a small in-RAM ``VectorIndex`` (the *delta*: demos
  added since), searched together; results are those of one index over the union (exact cosines,
  ties by id, ``keep_ties`` honoured);
* ``SharedIndexes``: the pool's indexes by key. On open, under the host's lock, it maps the current
  snapshot and reads from the database only the pooled ids and the vectors the snapshot lacks (the
  first worker on a host reads every vector, builds the graphs and writes the snapshot; the others
  wait for it and map it). A delta that reaches ``merge_threshold`` is merged into a new generation
  by whichever worker gets the lock first; the others map the new generation at their next check.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from icdistill.errors import ICDError
from icdistill.pool.demo_index import _Index
from icdistill.pool.demos import read_vectors
from icdistill.pool.index import IndexConfig, VectorIndex, spare_rows, unit_rows
from icdistill.pool.index_snapshot import SharedIndexConfig, Snapshot, SnapshotStore
from icdistill.pool.ranking import _top

log = logging.getLogger(__name__)

POOLED = "FROM icd_embeddings e JOIN icd_annotations a ON a.id = e.demo_id WHERE a.in_pool"
IDENTITY_SAMPLE = 16  # snapshot rows compared with the database's vectors on open


class _CsrMembers(Mapping[int, list[int]]):
    """A snapshot's groups (graph key -> ascending member ids) over its mapped CSR arrays, minus the
    members this worker removed. ``len`` counts every graph node, dead ones included: ``_ann`` asks
    the graph for up to that many."""

    def __init__(self, snap: Snapshot, row_of: np.ndarray) -> None:
        self._snap = snap
        self._row_of = row_of
        self._dead: dict[int, int] = {}  # group position -> removed members

    def _pos(self, g: int) -> int:
        gpos = self._snap.gpos
        return int(gpos[g]) if 0 <= g < len(gpos) else -1

    def live(self, g: int) -> np.ndarray:
        p = self._pos(g)
        if p < 0:
            raise KeyError(g)
        ms = np.asarray(self._snap.gmembers[self._snap.gptr[p] : self._snap.gptr[p + 1]])
        if self._dead.get(p):
            ms = ms[self._row_of[ms] >= 0]
        if not len(ms):
            raise KeyError(g)
        return ms

    def __getitem__(self, g: int) -> list[int]:
        return self.live(g).tolist()

    def __contains__(self, g: object) -> bool:
        if not isinstance(g, int):
            return False
        p = self._pos(g)
        return p >= 0 and self._dead.get(p, 0) < int(self._snap.gptr[p + 1] - self._snap.gptr[p])

    def __iter__(self) -> Iterator[int]:
        return (g for g in self._snap.gkeys.tolist() if g in self)

    def __len__(self) -> int:
        return len(self._snap.gkeys)

    def kill(self, row: int) -> None:
        p = int(self._snap.rgroup[row])
        self._dead[p] = self._dead.get(p, 0) + 1


class MappedIndex(VectorIndex):
    """A read-only ``VectorIndex`` over a mapped snapshot; ``remove`` hides demos in this worker."""

    def __init__(self, snap: Snapshot, config: IndexConfig) -> None:  # noqa: D107 - no super().__init__
        self.ndim = int(snap.vectors.shape[1])
        self.config = config
        self.snapshot = snap
        self._graph = snap.graph
        self._graph.expansion_search = config.expansion_search
        self._mat = snap.vectors
        self._row_ids = snap.ids
        n = len(snap.ids)
        self._live = np.ones(n, dtype=bool)
        self._n_rows = self._count = n
        self._row_of = np.full(int(snap.ids.max()) + 1 if n else 0, -1, dtype=np.int64)
        self._row_of[snap.ids] = np.arange(n)
        self._members = _CsrMembers(snap, self._row_of)  # type: ignore[assignment]
        self._member_arr = {}
        self._group_of_digest = {}
        self._group_digest = {}
        self._next_group = len(snap.gpos)

    @property
    def generation(self) -> int:
        return self.snapshot.gen

    def add(self, ids: Sequence[int] | np.ndarray, vectors: np.ndarray, threads: int = 1) -> None:
        raise ICDError("a mapped index snapshot is read-only: new demos go to the delta")

    def remove(self, ids: Sequence[int] | np.ndarray) -> None:
        members: _CsrMembers = self._members  # type: ignore[assignment]
        for demo_id in np.asarray(ids, dtype=np.int64).ravel().tolist():
            if demo_id not in self:
                continue
            row = int(self._row_of[demo_id])
            self._live[row] = False
            self._row_of[demo_id] = -1
            self._count -= 1
            members.kill(row)
        self._member_arr.clear()

    def _members_of(self, g: int) -> np.ndarray:
        arr = self._member_arr.get(g)
        if arr is None:
            arr = self._member_arr[g] = self._members.live(g)  # type: ignore[attr-defined]
            arr.setflags(write=False)
        return arr

    def memory_bytes(self) -> int:
        """What this worker holds in RAM for it (the mapped files are the host's, counted once)."""
        return int(self._live.nbytes + self._row_of.nbytes)


class LayeredIndex:
    """A mapped snapshot (``base``) and the demos added since (``delta``, in RAM), as one index."""

    def __init__(self, base: MappedIndex, delta: VectorIndex) -> None:
        self.base = base
        self.delta = delta
        self.ndim = base.ndim
        self.config = base.config

    @property
    def generation(self) -> int:
        return self.base.generation

    def __len__(self) -> int:
        return len(self.base) + len(self.delta)

    def __contains__(self, demo_id: int) -> bool:
        return demo_id in self.delta or demo_id in self.base

    @property
    def mode(self) -> str:
        return "ann" if len(self) >= self.config.exact_below else "exact"

    def ids(self) -> np.ndarray:
        return np.concatenate([self.base.ids(), self.delta.ids()])

    def matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """Ids and unit vectors (a copy when there is a delta or a removed demo: only for tools)."""
        if not len(self.delta):
            return self.base.matrix()
        bi, bm = self.base.matrix()
        di, dm = self.delta.matrix()
        ids, mat = np.concatenate([bi, di]), np.concatenate([bm, dm])
        ids.setflags(write=False)
        mat.setflags(write=False)
        return ids, mat

    def vector(self, demo_id: int) -> np.ndarray:
        return self.delta.vector(demo_id) if demo_id in self.delta else self.base.vector(demo_id)

    def set_expansion_search(self, ef: int) -> None:
        self.base.set_expansion_search(ef)
        self.delta.set_expansion_search(ef)

    def memory_bytes(self) -> int:
        return self.base.memory_bytes() + self.delta.memory_bytes()

    def add(self, ids: Sequence[int] | np.ndarray, vectors: np.ndarray, threads: int = 1) -> None:
        ids_a = np.asarray(ids, dtype=np.int64).ravel()
        self.base.remove(ids_a)  # an id already present is replaced, as in one index
        if self.delta.ndim != self.ndim:
            raise ICDError(f"expected vectors of dimension {self.ndim}")
        self.delta.add(ids_a, vectors, threads)

    def remove(self, ids: Sequence[int] | np.ndarray) -> None:
        self.base.remove(ids)
        self.delta.remove(ids)

    def search(
        self,
        vector: np.ndarray,
        k: int,
        candidates: Sequence[int] | np.ndarray | None = None,
        keep_ties: bool = False,
        exact: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``VectorIndex.search`` over both layers: each gives its best ``k`` (with ties), and the
        union's best ``k`` is among them (scores are rounded to 1e-5 in both, ties go to the older id)."""
        parts = [p.search(vector, k, candidates, keep_ties, exact) for p in (self.base, self.delta) if len(p)]
        parts = [p for p in parts if len(p[0])]
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if len(parts) == 1:
            return parts[0]
        ids = np.concatenate([p[0] for p in parts])
        scores = np.concatenate([p[1] for p in parts]).astype(np.float32)
        return _top(ids, scores, k, keep_ties)


AnyIndex = VectorIndex | LayeredIndex


class SharedIndexes(_Index):
    """The pool's index per key over this host's snapshots (see the module's docstring)."""

    def __init__(self, store: SnapshotStore, config: IndexConfig | None, shared: SharedIndexConfig) -> None:
        super().__init__(None, config)
        self.store = store
        self.shared = shared
        self._by_key: dict[str, AnyIndex] = {}  # type: ignore[assignment]
        self._next_check = time.monotonic() + shared.check_s

    # ------------------------------------------------------------------ open
    def open(self, db: Any, read_rows: Callable[[], list[tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
        """Map (or, first on this host, build and save) every key's snapshot and read what it lacks,
        all from one database snapshot; returns ``read_rows()``'s rows, read in that snapshot too."""
        with self.store.locked():
            plans: list[tuple[str, np.ndarray, Snapshot | None, np.ndarray, np.ndarray | None]] = []
            with db.transaction():
                db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                counts = db.execute(
                    f"SELECT e.key, COUNT(*) {POOLED} GROUP BY e.key ORDER BY e.key"
                ).fetchall()
                for key, count in counts:
                    ids = _id_array(
                        db.execute(f"SELECT e.demo_id {POOLED} AND e.key = %s ORDER BY e.demo_id", (key,))
                    )
                    snap = self.store.open(key, self._config)
                    if snap is not None and not _same_vectors(db, key, snap, ids):
                        log.warning(
                            "shared index %s: the snapshot's vectors are not this database's: rebuilt", key
                        )
                        snap = None
                    if snap is None:
                        with db.cursor(name="icd_load_vectors") as cur:
                            cur.itersize = 4096
                            cur.execute(
                                f"SELECT e.demo_id, e.vec {POOLED} AND e.key = %s ORDER BY e.demo_id", (key,)
                            )
                            got, mat = read_vectors(cur, int(count))
                        plans.append((key, got, None, got, mat))
                        continue
                    missing = np.setdiff1d(ids, snap.ids, assume_unique=True)
                    mat = _read_some(db, key, missing) if len(missing) else None
                    plans.append((key, ids, snap, missing, mat))
                rows = read_rows()
            # graphs are built outside the database snapshot (minutes at 1M: no transaction that long)
            while plans:
                key, ids, snap, missing, mat = plans.pop(0)
                if snap is None:
                    if mat is None:
                        continue
                    built = VectorIndex.build(ids, mat, self._config)
                    mat, missing = None, ids[:0]
                    self.store.write(key, built)
                    del built
                    snap = self.store.open(key, self._config)
                    if snap is None:
                        raise ICDError(f"shared index {key}: the snapshot just written cannot be opened")
                    how = f"built gen {snap.gen}"
                else:
                    how = f"mapped gen {snap.gen}" + (f" +{len(missing)}" if len(missing) else "")
                layered = LayeredIndex(
                    MappedIndex(snap, self._config), VectorIndex(snap.vectors.shape[1], self._config)
                )
                layered.base.remove(np.setdiff1d(snap.ids, ids, assume_unique=True))
                if mat is not None and len(missing):
                    layered.delta.add(missing, mat[: len(missing)], threads=os.cpu_count() or 1)
                self._by_key[key] = layered
                self.opened[key] = how
                if len(layered.delta) >= self.shared.merge_threshold(len(snap.ids)):
                    self._merge(key)
        return rows

    # ------------------------------------------------------------------ keeping up
    # ``add`` does not roll: a merge can take minutes at scale, so the pool calls ``maybe_roll`` once
    # it holds no lock (its heartbeat renews claims on the listener meanwhile)

    def save(self) -> None:
        """Nothing to save per worker: the host's snapshots are written by merges."""
        self._dirty.clear()

    def maybe_roll(self, force: bool = False) -> None:
        """Every ``check_s``: map a newer generation another worker wrote, or merge a delta that has
        reached its threshold into a new one (when no other worker of the host is writing). A folder
        that cannot be written (disk full) leaves the delta as it is, with a warning."""
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + self.shared.check_s
        try:
            self._roll()
        except OSError as e:
            log.warning("shared index in %s: cannot write a new snapshot (%s); kept in RAM", self.store.folder, e)

    def _roll(self) -> None:
        for key in list(self._by_key):
            index = self._by_key[key]
            mine = index.generation if isinstance(index, LayeredIndex) else None
            gen = self.store.current_gen(key)
            if gen is not None and gen != mine:
                self._map_newer(key)
                continue
            pending = len(index.delta) if isinstance(index, LayeredIndex) else len(index)
            rows = len(index.base.snapshot.ids) if isinstance(index, LayeredIndex) else 0
            if not pending or pending < self.shared.merge_threshold(rows):
                continue
            with self.store.locked(blocking=False) as got:
                if not got:
                    continue  # another worker is writing: its generation is mapped at a later check
                if self.store.current_gen(key) != mine:
                    self._map_newer(key)
                else:
                    self._merge(key)

    def _map_newer(self, key: str) -> None:
        snap = self.store.open(key, self._config)
        if snap is not None:
            self._adopt(key, snap)

    def _merge(self, key: str) -> None:
        """Write this worker's view of ``key`` (snapshot minus removed, plus delta) as the next
        generation and map it; the caller holds the host's lock. The saved graph is reused (only the
        delta's groups are added to it), so a merge costs the delta, not a rebuild."""
        index = self._by_key[key]
        ids, mat = index.matrix()
        if not len(ids):
            return
        buffer = np.empty((len(ids) + spare_rows(len(ids)), index.ndim), dtype=np.float32)
        buffer[: len(ids)] = mat
        del mat
        if isinstance(index, LayeredIndex):
            full, how = VectorIndex.load(
                index.base.snapshot.graph_path, ids, buffer, self._config, adopt=True
            )
        else:
            full, how = VectorIndex.build(ids, buffer, self._config), "built"
        self.store.write(key, full)
        del full, buffer
        log.info("shared index %s: merged %d vectors (%s)", key, len(ids), how)
        self._map_newer(key)

    def _adopt(self, key: str, snap: Snapshot) -> None:
        """Map ``snap`` in place of ``key``'s index: its rows this worker does not hold are hidden,
        this worker's demos it lacks form the new delta."""
        old = self._by_key[key]
        live = old.ids()
        base = MappedIndex(snap, self._config)
        base.remove(np.setdiff1d(snap.ids, live))
        extra = np.setdiff1d(live, snap.ids)
        delta = VectorIndex(base.ndim, self._config)
        if len(extra):
            delta.add(extra, np.stack([old.vector(int(i)) for i in extra.tolist()]))
        self._by_key[key] = LayeredIndex(base, delta)
        self.opened[key] = f"mapped gen {snap.gen}" + (f" +{len(extra)}" if len(extra) else "")


def _id_array(cursor: Any) -> np.ndarray:
    return np.fromiter((r[0] for r in cursor), dtype=np.int64)


def _read_some(db: Any, key: str, ids: np.ndarray) -> np.ndarray:
    """The stored vectors of ``ids`` (ascending) for ``key``, in their order."""
    got: dict[int, bytes] = dict(
        db.execute(
            "SELECT demo_id, vec FROM icd_embeddings WHERE key = %s AND demo_id = ANY(%s)",
            (key, ids.tolist()),
        ).fetchall()
    )
    rows = [np.frombuffer(got[int(i)], dtype=np.float32) for i in ids.tolist()]
    return np.ascontiguousarray(np.stack(rows), dtype=np.float32)


def _same_vectors(db: Any, key: str, snap: Snapshot, ids: np.ndarray) -> bool:
    """Whether a sample of rows the snapshot shares with the database holds the database's vectors
    (a snapshot of another database, or of one dropped and made again, is not used)."""
    common = np.intersect1d(snap.ids, ids, assume_unique=True)
    if not len(common):
        return len(snap.ids) == 0 or len(ids) == 0
    pick = common[np.linspace(0, len(common) - 1, min(IDENTITY_SAMPLE, len(common))).astype(np.int64)]
    pick = np.unique(pick)
    stored = unit_rows(_read_some(db, key, pick))
    rows = np.searchsorted(snap.ids, pick) if _ascending(snap.ids) else _rows_of(snap.ids, pick)
    if stored.shape[1] != snap.vectors.shape[1]:
        return False
    return bool(np.abs(np.asarray(snap.vectors[rows]) - stored).max() < 1e-5)


def _ascending(a: np.ndarray) -> bool:
    return bool(len(a) < 2 or np.all(a[1:] > a[:-1]))


def _rows_of(ids: np.ndarray, pick: np.ndarray) -> np.ndarray:
    order = np.argsort(ids)
    return order[np.searchsorted(ids, pick, sorter=order)]
