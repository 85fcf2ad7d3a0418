"""The PostgreSQL pool's connections: a lost connection (server restart, terminated backend) is
reopened with backoff for up to ``reconnect_s``, then ``PoolUnavailable``; URLs are redacted in messages."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from icdistill.errors import ICDError, PoolUnavailable

T = TypeVar("T")

log = logging.getLogger(__name__)


class _Connections:
    """The connections part of ``PostgresPool`` (reconnects, retries; a mixin: it works on the
    pool's own state)."""

    # ------------------------------------------------------------------ connections
    def _lost(self, e: BaseException, conn: Any) -> bool:
        """Whether ``e`` means the connection (or the server) is gone, not that the statement failed."""
        if not isinstance(e, self._psycopg.OperationalError):
            return False
        if conn is None or conn.closed or conn.broken:
            return True
        state = getattr(e, "sqlstate", None)
        # 08: connection exception; 57P01-57P03: admin/crash shutdown, cannot connect now
        return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` on the work connection; a lost connection is reopened with backoff and ``fn`` run
        again (every caller's work is idempotent) for up to ``reconnect_s``; other database errors
        are an ICDError (an integrity error is the caller's to read)."""
        deadline: float | None = None
        delay = 0.1
        while True:
            if self._closed:
                raise ICDError("the pool is closed")
            try:
                if self._db is None or self._db.closed or self._db.broken:
                    with contextlib.suppress(Exception):
                        self._db.close()
                    self._db = self._connect()
                    self.db_reconnects += 1
                return fn()
            except self._psycopg.IntegrityError:
                raise
            except self._psycopg.Error as e:
                if not self._lost(e, self._db):
                    raise ICDError(f"pool {_redact(self.url)}: {what} failed: {_first_line(e)}") from e
                # a connection that lost its server may not know it yet (psycopg left in pipeline mode
                # after a restart: "cannot exit pipeline mode while busy" on every later statement):
                # the next try opens a new one
                with contextlib.suppress(Exception):
                    self._db.close()
                deadline = self._backoff(deadline, e, what)
                delay = _sleep(delay)

    def _backoff(self, deadline: float | None, e: BaseException, what: str) -> float:
        """The retry deadline of a lost connection (set on its first loss); past it, PoolUnavailable."""
        now = time.monotonic()
        if deadline is None:
            log.warning("lost the pool database while %s (%s): reconnecting", what, _first_line(e))
            return now + self.reconnect_s
        if now > deadline:
            raise PoolUnavailable(
                f"lost the pool database {_redact(self.url)} for {self.reconnect_s:g} s while {what} "
                f"({_first_line(e)}); what was stored is kept: resume once the database is back"
            ) from None
        return deadline

    def _on_listener(self, what: str, fn: Callable[[Any], T]) -> T:
        """``fn(listener)`` under the listener's lock; a lost listener is reopened (it LISTENs again,
        and the next refresh catches up by id, since notifications may have been lost meanwhile)."""
        deadline: float | None = None
        delay = 0.1
        with self._listen_lock:
            while True:
                if self._closed:
                    raise ICDError("the pool is closed")
                try:
                    if self._listen is None or self._listen.closed or self._listen.broken:
                        with contextlib.suppress(Exception):
                            self._listen.close()
                        self._listen = None
                        conn = self._connect(self.listen_url)
                        self._listen_to(conn)
                        self._listen = conn
                        self.reconnects += 1
                        self._must_catch_up = True
                    return fn(self._listen)
                except self._psycopg.Error as e:
                    if not self._lost(e, self._listen):
                        raise ICDError(f"pool {_redact(self.url)}: {what} failed: {_first_line(e)}") from e
                    with contextlib.suppress(Exception):
                        self._listen.close()
                    deadline = self._backoff(deadline, e, what)
                    delay = _sleep(delay)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

def _sleep(delay: float) -> float:
    """Sleep ``delay`` (a reconnection's backoff) and return the next one, doubled up to 2 s."""
    time.sleep(delay)
    return min(delay * 2, 2.0)

def _redact(url: str) -> str:
    """The URL without its password, for error messages."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    cred, host = rest.rsplit("@", 1)
    return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url
