"""One PostgreSQL connection that is reopened, with bounded backoff, when the server drops it.

``PostgresPool`` has its own copy of this logic for its two connections (``_retrying`` and
``_on_listener``); the service's store (``PostgresServiceStore``) uses this class for each of its
connections. A statement or transaction that failed because the connection was lost (the server
restarted, an administrator ended the backend) is run again on a new connection, with backoff (0.1 s
doubling to 2 s), for up to ``reconnect_s`` seconds; then ``DatabaseUnavailable``, one line. Every
caller must hand in idempotent work: a transaction that never committed left nothing, and one whose
commit landed before the connection dropped must be recognised when run again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from icdistill.errors import DatabaseUnavailable, ICDError

__all__ = ["DatabaseUnavailable", "Reconnecting", "first_line", "is_lost"]

T = TypeVar("T")
log = logging.getLogger(__name__)

# 08: connection exception; 57P01-57P03: admin shutdown, crash shutdown, cannot connect now
LOST_STATES = ("57P01", "57P02", "57P03")


def is_lost(psycopg: Any, e: BaseException, conn: Any) -> bool:
    """Whether ``e`` means the connection (or the server) is gone, not that the statement failed."""
    if not isinstance(e, psycopg.OperationalError):
        return False
    if conn is None or conn.closed or conn.broken:
        return True
    state = getattr(e, "sqlstate", None)
    return state is None or state.startswith("08") or state in LOST_STATES


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class Reconnecting:
    """A connection made by ``connect()`` on first use and again after a loss; ``run(what, fn)``
    runs ``fn(conn)`` under a lock (any thread), retrying it on a new connection while the database
    is away. ``reconnects`` counts the connections reopened (tests, stats)."""

    def __init__(self, connect: Callable[[], Any], where: str, reconnect_s: float = 120.0) -> None:
        import psycopg

        self._psycopg = psycopg
        self._connect = connect
        self.where = where
        self.reconnect_s = reconnect_s
        self.reconnects = 0
        self._conn: Any = None
        self._opened = False
        self._closed = False
        self._lock = threading.RLock()

    def open(self) -> Any:
        """Connect now (errors are the caller's: the first connection is not retried)."""
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
                self._opened = True
            return self._conn

    def run(self, what: str, fn: Callable[[Any], T], again: Callable[[Any], T] | None = None) -> T:
        """``fn(conn)``; after a lost connection, ``again(conn)`` (default ``fn``) on a new one: a
        write whose commit may have landed passes ``again`` to recognise it."""
        deadline: float | None = None
        delay = 0.1
        retry = False
        with self._lock:
            while True:
                if self._closed:
                    raise ICDError(f"{self.where} is closed")
                conn = self._conn
                try:
                    if conn is None or conn.closed or conn.broken:
                        with contextlib.suppress(Exception):
                            conn.close()
                        self._conn = None
                        conn = self._conn = self._connect()
                        if self._opened:
                            self.reconnects += 1
                        self._opened = True
                    return (again or fn)(conn) if retry else fn(conn)
                except self._psycopg.Error as e:
                    if not is_lost(self._psycopg, e, conn):
                        raise
                    with contextlib.suppress(Exception):
                        conn.close()
                    now = time.monotonic()
                    if deadline is None:
                        log.warning("lost %s while %s (%s): reconnecting", self.where, what, first_line(e))
                        deadline = now + self.reconnect_s
                    elif now > deadline:
                        raise DatabaseUnavailable(
                            f"lost {self.where} for {self.reconnect_s:g} s while {what} ({first_line(e)}); "
                            "what was committed is kept: restart once the database is back"
                        ) from None
                    retry = True
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
