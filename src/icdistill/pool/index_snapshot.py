"""Saved snapshots of a pool's vector index on one host: written once, memory-mapped by every worker.

A snapshot of one embedding key is a folder ``gen-<N>`` of plain files: the unit vectors
(``vectors.npy``, float32, one row per demo), their demo ids (``ids.npy``), the group table of the
HNSW graph (identical vectors share one graph node: ``gkeys``/``gptr``/``gmembers`` in CSR form,
``gpos`` from a graph key to its group, ``rgroup`` from a row to its group) and the graph itself
(``graph.usearch``, usearch's file, with ``VectorIndex.save``'s group digests beside it). Workers
open the arrays with ``np.load(mmap_mode="r")`` and the graph as a usearch *view*: the pages are the
kernel's page cache, mapped once per host however many workers read them.

Crash safety: a snapshot is written into ``gen-<N>.tmp-<pid>``, every file fsynced, the folder
renamed to ``gen-<N>``, and only then ``CURRENT`` (a small JSON naming the generation and every
file's size) replaced atomically. A reader opens only what ``CURRENT`` names and checks each size, so
a half-written snapshot (a writer killed, a truncated file) is never opened: it is ignored, and the
next writer rebuilds. Writers hold the host's lock (``flock`` on ``lock``): one builds or extends a
snapshot at a time, the others wait for it (on open) or go on with their own delta (when merging).
Old generations are deleted two generations later; a worker that still maps one keeps its pages (an
unlinked file stays readable through an existing mapping).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icdistill.errors import ICDError
from icdistill.pool.index import IndexConfig, VectorIndex

log = logging.getLogger(__name__)

# where the snapshots live (a folder), or "off": each worker then keeps its own index in RAM
CACHE_ENV = "ICD_POOL_CACHE"
ARRAYS = ("ids", "vectors", "gkeys", "gptr", "gmembers", "gpos", "rgroup")
GRAPH = "graph.usearch"


@dataclass(frozen=True)
class SharedIndexConfig:
    """Where a host keeps its pools' snapshots and when a worker's delta becomes a new snapshot.

    ``root``: one folder per pool database below it (see ``pool_identity``). A worker's delta (demos
    added since the snapshot it maps) is merged into a new snapshot once it holds ``merge_at`` demos
    or ``merge_fraction`` of the snapshot, whichever is more; ``check_s``: how often a worker looks
    for a newer snapshot (another worker's merge) and for a delta due for merging."""

    root: Path
    merge_at: int = 4096
    merge_fraction: float = 0.05
    check_s: float = 5.0

    def __post_init__(self) -> None:
        if self.merge_at < 1 or not self.merge_fraction >= 0 or self.check_s < 0:
            raise ICDError("shared index: merge_at must be >= 1, merge_fraction and check_s >= 0")

    def merge_threshold(self, snapshot_rows: int) -> int:
        return max(self.merge_at, int(self.merge_fraction * snapshot_rows))


def shared_index_from_env(env: Mapping[str, str] | None = None) -> SharedIndexConfig | None:
    """The host's snapshot folder: ``$ICD_POOL_CACHE``, else ``$XDG_CACHE_HOME/icdistill/pool-index``
    (``~/.cache/...``); None when ``ICD_POOL_CACHE=off``."""
    env = os.environ if env is None else env
    value = env.get(CACHE_ENV, "").strip()
    if value.lower() == "off":
        return None
    if value:
        return SharedIndexConfig(Path(value).expanduser())
    cache = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return SharedIndexConfig(Path(cache) / "icdistill" / "pool-index")


def pool_identity(conn: Any) -> str:
    """A folder name for the pool's database: the cluster's system identifier (where the role may
    read it), the server's address, the database's name and oid. A database dropped and made again
    gets another oid; the vectors of a snapshot are also compared with the database's on open."""
    sysid = ""
    with contextlib.suppress(Exception):
        row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
        sysid = str(row[0]) if row else ""
    name, oid = conn.execute(
        "SELECT current_database(), (SELECT oid FROM pg_database WHERE datname = current_database())::text"
    ).fetchone()
    info = conn.info
    key = f"{sysid}|{info.host}:{info.port}|{name}|{oid}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return f"{_safe(str(name))}-{digest}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:48] or "_"


@dataclass
class Snapshot:
    """One opened generation: read-only memory-mapped arrays and a usearch view of the graph."""

    key: str
    gen: int
    folder: Path
    ids: np.ndarray
    vectors: np.ndarray
    gkeys: np.ndarray
    gptr: np.ndarray
    gmembers: np.ndarray
    gpos: np.ndarray
    rgroup: np.ndarray
    graph: Any

    @property
    def graph_path(self) -> Path:
        return self.folder / GRAPH


class SnapshotStore:
    """The snapshots of one pool database on this host: ``folder/<key>/gen-<N>`` and ``CURRENT``.

    ``writes`` and ``opens`` count this process's snapshot writes and successful opens (tests)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writes = 0
        self.opens = 0
        self._locked = 0

    def key_dir(self, key: str) -> Path:
        return self.folder / _safe(key)

    @contextlib.contextmanager
    def locked(self, blocking: bool = True) -> Iterator[bool]:
        """The host's writer lock for this pool; yields False when ``blocking`` is off and another
        process holds it. Re-entrant within a process."""
        if self._locked:
            self._locked += 1
            try:
                yield True
            finally:
                self._locked -= 1
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            self._locked = 1
            try:
                yield True
            finally:
                self._locked = 0
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def current(self, key: str) -> dict[str, Any] | None:
        """What ``CURRENT`` says (generation, file sizes, settings), or None."""
        try:
            meta = json.loads((self.key_dir(key) / "CURRENT").read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and isinstance(meta.get("gen"), int) else None

    def current_gen(self, key: str) -> int | None:
        meta = self.current(key)
        return None if meta is None else int(meta["gen"])

    def open(self, key: str, config: IndexConfig) -> Snapshot | None:
        """The current snapshot of ``key``, mapped; None when there is none, it was built with other
        HNSW settings, or any of its files is missing or of another size than ``CURRENT`` says."""
        meta = self.current(key)
        if meta is None:
            return None
        if meta.get("dtype") != config.dtype or meta.get("connectivity") != config.connectivity:
            log.info("shared index %s: the snapshot was built with other HNSW settings", key)
            return None
        folder = self.key_dir(key) / f"gen-{meta['gen']}"
        try:
            sizes = meta["sizes"]
            for name, size in sizes.items():
                if (folder / name).stat().st_size != int(size):
                    log.warning("shared index %s: %s is torn (its size is not CURRENT's): ignored", key, name)
                    return None
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
            from usearch.index import Index

            graph = Index.restore(str(folder / GRAPH), view=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            log.warning("shared index %s: cannot open generation %s (%s): ignored", key, meta.get("gen"), e)
            return None
        if graph is None or len(graph) < len(arrays["gkeys"]) or arrays["vectors"].ndim != 2:
            log.warning("shared index %s: generation %s does not hold together: ignored", key, meta["gen"])
            return None
        self.opens += 1
        return Snapshot(key, int(meta["gen"]), folder, graph=graph, **arrays)

    def write(self, key: str, index: VectorIndex) -> int:
        """Save ``index`` (in RAM, no removed rows pending) as the next generation of ``key``; the
        caller holds ``locked()``. Returns the generation."""
        if not self._locked:
            raise ICDError("writing a shared index snapshot needs the host's lock")
        kdir = self.key_dir(key)
        kdir.mkdir(parents=True, exist_ok=True)
        for stale in kdir.glob("gen-*.tmp-*"):  # a writer killed mid-write (we hold the lock now)
            shutil.rmtree(stale, ignore_errors=True)
        gen = (self.current_gen(key) or 0) + 1
        tmp = kdir / f"gen-{gen}.tmp-{os.getpid()}"
        tmp.mkdir()
        ids, mat = index.matrix()
        members = index._members  # group -> ascending ids
        gkeys = np.asarray(sorted(members), dtype=np.int64)
        counts = np.fromiter((len(members[g]) for g in gkeys.tolist()), dtype=np.int64, count=len(gkeys))
        gptr = np.zeros(len(gkeys) + 1, dtype=np.int64)
        np.cumsum(counts, out=gptr[1:])
        gmembers = (
            np.concatenate([np.asarray(members[g], dtype=np.int64) for g in gkeys.tolist()])
            if len(gkeys)
            else np.zeros(0, dtype=np.int64)
        )
        gpos = np.full(int(gkeys.max()) + 1 if len(gkeys) else 0, -1, dtype=np.int64)
        gpos[gkeys] = np.arange(len(gkeys))
        row_of = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, dtype=np.int64)
        row_of[ids] = np.arange(len(ids))
        rgroup = np.empty(len(ids), dtype=np.int64)
        rgroup[row_of[gmembers]] = np.repeat(np.arange(len(gkeys)), counts)
        arrays = {"ids": ids, "vectors": mat, "gkeys": gkeys, "gptr": gptr, "gmembers": gmembers,
                  "gpos": gpos, "rgroup": rgroup}  # fmt: skip
        for name, arr in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, np.ascontiguousarray(arr))
                f.flush()
                os.fsync(f.fileno())
        index.save(tmp / GRAPH)  # fsynced, with its group digests beside it
        _fsync_dir(tmp)
        final = kdir / f"gen-{gen}"
        shutil.rmtree(final, ignore_errors=True)  # a generation CURRENT never named (torn)
        os.rename(tmp, final)
        sizes = {p.name: p.stat().st_size for p in sorted(final.iterdir())}
        meta = {"gen": gen, "rows": len(ids), "ndim": index.ndim, "dtype": index.config.dtype,
                "connectivity": index.config.connectivity, "sizes": sizes}  # fmt: skip
        current = kdir / f"CURRENT.tmp-{os.getpid()}"
        with open(current, "w") as f:
            f.write(json.dumps(meta))
            f.flush()
            os.fsync(f.fileno())
        os.replace(current, kdir / "CURRENT")
        _fsync_dir(kdir)
        for old in kdir.glob("gen-*"):
            m = re.fullmatch(r"gen-(\d+)", old.name)
            if m and int(m.group(1)) < gen - 1:
                shutil.rmtree(old, ignore_errors=True)
        self.writes += 1
        log.info("shared index %s: wrote generation %d (%d vectors)", key, gen, len(ids))
        return gen


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
