"""A disk cache of chat-completion choices (SQLite, WAL), shared across runs and processes.

One row per (model, server, messages, params, sample index), so N sampled answers stay N answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_FILE = "openai-responses.sqlite"
CACHE_DIR_ENV = "ICDISTILL_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$ICDISTILL_CACHE_DIR`` if set, else ``~/.cache/icdistill``."""
    root = os.environ.get(CACHE_DIR_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "icdistill"


def cache_key(
    model: str,
    base_url: str,
    messages: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    sample_index: int,
) -> str:
    """sha256 over everything that determines one sampled answer; credentials are never part of it."""
    blob = json.dumps(
        {"model": model, "base_url": base_url, "messages": messages, "params": params, "i": sample_index},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """Key -> JSON value store. Errors (locked, corrupt or read-only file) degrade to cache misses."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_dir() / CACHE_FILE
        # One connection used from several threads (one per client's event loop), serialised by a lock.
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._broken = False

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection | None:
        if self._conn is not None or self._broken:
            return self._conn
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            # WAL lets concurrent runs read while one writes.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"
            )
        except (sqlite3.Error, OSError) as e:
            self._disable(e)
            return None
        self._conn = conn
        return conn

    def _disable(self, err: Exception) -> None:
        if not self._broken:
            log.warning("response cache %s disabled: %s", self.path, err)
        self._broken = True
        self._conn = None

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            conn = self._connect()
            if conn is None:
                return None
            try:
                row = conn.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error as e:
                self._disable(e)
                return None
        if row is None:
            return None
        try:
            value = json.loads(row[0])
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        with self._lock:
            conn = self._connect()
            if conn is None:
                return
            try:
                # First writer wins, so concurrent runs agree on every cached sample.
                conn.execute(
                    "INSERT OR IGNORE INTO responses (key, value, created) VALUES (?, ?, ?)",
                    (key, json.dumps(value, ensure_ascii=False), time.time()),
                )
            except sqlite3.Error as e:
                self._disable(e)

    def __len__(self) -> int:
        with self._lock:
            conn = self._connect()
            if conn is None:
                return 0
            return int(conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
