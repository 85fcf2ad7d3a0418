"""How ``icd serve`` listens: uvicorn with the defences a public server needs.

* The client address is the socket's peer. ``X-Forwarded-For`` is believed only from the proxies
  named in ``--forwarded-allow-ips`` (none by default): uvicorn's own default trusts 127.0.0.1, so
  every client of a loopback server could name any address and dodge the wrong-key throttle.
* A request's headers must arrive within ``header_timeout_s`` of the connection opening (or of the
  previous response on a kept-alive connection): a slowloris client that sends a header line every
  few seconds is cut off.
* At most ``max_connections_per_client`` connections are open from one address (unless a proxy is
  trusted: then every client comes from its address), so one slowloris host cannot fill the rest.
* At most ``max_connections`` connections are open at once (kept ``FD_RESERVE`` below the open-files
  limit, which is raised to its hard limit first); one more is answered 503 and closed at once, so
  the server never runs out of file descriptors.
* Logs of one kind that come in a storm (``Too many open files``, ``Exceeded concurrency limit``) are
  written once per ``LOG_EVERY_S`` with a count of those left out.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
import threading
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from icdistill.service.config import ServeConfig
from icdistill.service.memory import tune_malloc

log = logging.getLogger(__name__)
# asyncio accepts up to ``backlog`` connections in one go before any is looked at: the cap leaves room
# for a whole burst, and for the pool file, the models and the logs
BACKLOG = 128
FD_RESERVE = 2 * BACKLOG
LOG_EVERY_S = 10.0
_BUSY_BODY = b'{"error": {"code": "too_many_connections", "message": "too many open connections; retry"}}'
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return int(soft)


def connection_cap(wanted: int) -> int:
    """``wanted``, or fewer where the open-files limit would run out first."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, int(soft) - FD_RESERVE))


def guarded_protocol(
    max_connections: int, header_timeout_s: float, per_client: int | None = None
) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline, a connection cap, and a cap per client address
    (``per_client``; None behind a proxy, whose address every client shares)."""
    open_by: dict[str, int] = {}

    class Guarded(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _peer: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = self.client[0] if self.client else "?"
            crowded = per_client is not None and open_by.get(peer, 0) >= per_client
            if crowded or len(self.connections) > max_connections:
                transport.write(BUSY)
                transport.close()
                return
            self._peer = peer
            open_by[peer] = open_by.get(peer, 0) + 1
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state in (h11.IDLE,) and not self.transport.is_closing():
                # still waiting for the request line or its headers: a client this slow is cut off
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self._header_timer is not None and self.conn.their_state not in (h11.IDLE,):
                self._cancel_header_timer()  # the headers are in

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm_header_timer()  # the next request on this connection has as long

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            if self._peer is not None:
                left = open_by.get(self._peer, 1) - 1
                if left > 0:
                    open_by[self._peer] = left
                else:
                    open_by.pop(self._peer, None)
                self._peer = None
            super().connection_lost(exc)

    return Guarded


class StormFilter(logging.Filter):
    """Passes the first record of a storm-prone kind each ``every_s``; counts the rest, and says how
    many were left out with the next one that passes."""

    STORMS = ("Too many open files", "out of system resource", "Exceeded concurrency limit")

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}
        self._lock = threading.Lock()

    def _kind(self, record: logging.LogRecord) -> str | None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + str(record.exc_info[1])
        return next((k for k in self.STORMS if k in text), None)

    def filter(self, record: logging.LogRecord) -> bool:
        kind = self._kind(record)
        if kind is None:
            return True
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e9) < self.every_s:
                self._dropped[kind] = self._dropped.get(kind, 0) + 1
                return False
            self._last[kind] = now
            dropped = self._dropped.pop(kind, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like it in the last {self.every_s:.0f} s not logged)"
        record.exc_info = None  # one line, not a traceback each time
        record.exc_text = None
        return True


def install_storm_filter() -> StormFilter:
    f = StormFilter()
    for name in ("asyncio", "uvicorn.error", "uvicorn"):
        logging.getLogger(name).addFilter(f)
    return f


def uvicorn_config(app: Any, cfg: ServeConfig, **extra: Any) -> Any:
    """The uvicorn settings of ``icd serve`` (the tests run the service with these too)."""
    import uvicorn

    trusted = cfg.forwarded_allow_ips
    return uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        http=guarded_protocol(
            connection_cap(cfg.max_connections),
            cfg.header_timeout_s,
            None if trusted is not None else cfg.max_connections_per_client,
        ),
        proxy_headers=trusted is not None,
        forwarded_allow_ips=trusted if trusted is not None else "",
        timeout_keep_alive=5,
        backlog=BACKLOG,
        timeout_graceful_shutdown=5,
        **extra,
    )


def run_server(app: Any, cfg: ServeConfig, **extra: Any) -> None:
    """Serve ``app`` until stopped (SIGINT/SIGTERM)."""
    import uvicorn

    raise_fd_limit()
    install_storm_filter()
    tune_malloc()
    # the event loop waits at most this long for the GIL held by a thread running Python (default 5 ms)
    sys.setswitchinterval(0.001)
    uvicorn.Server(uvicorn_config(app, cfg, **extra)).run()
