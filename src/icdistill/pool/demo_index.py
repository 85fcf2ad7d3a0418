"""A pool's in-memory search structures: one ``VectorIndex`` per embedding key, persisted beside the
pool and reconciled with it on open, and the pooled demo ids per kind of question (its option set)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from icdistill.errors import ICDError
from icdistill.pool.demos import IndexedEmbeddings
from icdistill.pool.index import IndexConfig, VectorIndex
from icdistill.types import (
    Embeddings,
)


class _Index:
    """One ``VectorIndex`` per embedding key (exact while small, HNSW beyond; see icdistill.pool.index),
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
