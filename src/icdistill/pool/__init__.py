"""The demonstration pool: where teacher annotations become demonstrations, and how they are found.

What callers use is imported from here (``from icdistill.pool import SQLitePool``); each module holds
one job:

- ``sqlite``: the pool of one process, a SQLite file (WAL) with an in-memory index.
- ``pg``: the pool many workers share over PostgreSQL; its connections (``pg_connection``), its sync by
  LISTEN/NOTIFY (``pg_notify``), its claims (``pg_claims``), its budget ledger (``pg_ledger``) and its
  schema (``pg_schema``); ``claiming``: the teacher wrapper that buys each label once across workers;
  ``pg_reconnect``: one connection reopened after a loss (the service's PostgreSQL store).
- ``shared_index``: one index per host for a shared pool's workers (a mapped snapshot plus a delta in
  RAM); ``index_snapshot``: the saved snapshots it maps (crash-safe generations under a host lock).
- ``demos``: demonstrations as every backend builds and stores them (shared demo construction).
- ``demo_index``: a pool's per-key vector indexes and its demo ids per kind of question.
- ``index``: nearest-neighbour search over one embedding space (exact, then HNSW); ``ranking``: top-k.
- ``image_cache``: the bounded cache of decoded images.
"""

from icdistill.pool.claiming import ClaimingAnnotator, ReusedAnnotation, reused_annotation
from icdistill.pool.demos import AddStatus, IndexedEmbeddings, StoredDemo
from icdistill.pool.image_cache import ImageCache
from icdistill.pool.index import IndexConfig, VectorIndex, unit_rows
from icdistill.pool.index_snapshot import SharedIndexConfig, shared_index_from_env
from icdistill.pool.pg import LISTEN_URL_ENV, PostgresPool, is_postgres_url
from icdistill.pool.sqlite import SQLitePool

__all__ = [
    "AddStatus",
    "ClaimingAnnotator",
    "ImageCache",
    "IndexConfig",
    "IndexedEmbeddings",
    "LISTEN_URL_ENV",
    "PostgresPool",
    "ReusedAnnotation",
    "SQLitePool",
    "SharedIndexConfig",
    "StoredDemo",
    "VectorIndex",
    "is_postgres_url",
    "reused_annotation",
    "shared_index_from_env",
    "unit_rows",
]
