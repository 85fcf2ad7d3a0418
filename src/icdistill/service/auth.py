"""API keys (Bearer, compared in constant time), and the labelling page's login cookie and CSRF tokens.

A session cookie is ``<id>.<issued>.<signature>``: the server refuses it after ``SESSION_S`` whatever the
browser keeps, and after a logout (ids ended are written to the store and remembered, through
restarts, until they would expire anyway). The client of the wrong-key throttle is the socket's peer
(``icd serve`` believes ``X-Forwarded-For`` only from ``--forwarded-allow-ips``). It is
``Secure`` when the page is served over https, or behind a proxy that says so (X-Forwarded-Proto).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque

from fastapi import Request
from fastapi.responses import Response

from icdistill.errors import ServiceError

COOKIE = "icd_label_session"
SESSION_S = 12 * 3600
FAILURES_ALLOWED = 10  # wrong keys or logins per client address and window, before it must wait
FAILURE_WINDOW_S = 60.0


class Throttle:
    """Wrong keys and logins per client address: after ``limit`` in ``window_s`` the address gets 429
    until the oldest ages out (guessing slows to ``limit`` a minute; other addresses are unaffected)."""

    def __init__(self, limit: int = FAILURES_ALLOWED, window_s: float = FAILURE_WINDOW_S) -> None:
        self.limit = limit
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def wait_s(self, client: str) -> float:
        """Seconds ``client`` must wait before its next try; 0 when it may try now."""
        now = time.monotonic()
        with self._lock:
            times = self._failures.get(client)
            while times and times[0] <= now - self.window_s:
                times.popleft()
            if not times:
                self._failures.pop(client, None)
                return 0.0
            return times[0] + self.window_s - now if len(times) >= self.limit else 0.0

    def failed(self, client: str) -> None:
        with self._lock:
            if len(self._failures) > 10_000:  # many addresses: forget the quiet ones
                self._failures = {k: v for k, v in self._failures.items() if len(v) >= self.limit}
            self._failures.setdefault(client, deque(maxlen=self.limit)).append(time.monotonic())


def client_of(request: Request) -> str:
    return request.client.host if request.client is not None else "?"


class Auth:
    """``api_key=None`` means no authentication (only allowed on loopback, checked in ``ServeConfig``)."""

    def __init__(self, api_key: str | None, ended: dict[str, float] | None = None) -> None:
        self.api_key = api_key
        # signs session cookies and CSRF tokens; derived from the key so sessions survive restarts
        seed = api_key.encode() if api_key else secrets.token_bytes(32)
        self._secret = hashlib.sha256(b"icd-label-session\x00" + seed).digest()
        self.throttle = Throttle()
        # session id -> when it would have expired; the logouts before a restart come from the store
        self._ended: dict[str, float] = dict(ended or {})
        self._lock = threading.Lock()

    def key_ok(self, presented: str) -> bool:
        if self.api_key is None:
            return True
        return hmac.compare_digest(presented.encode(), self.api_key.encode())

    def require_key(self, request: Request) -> None:
        """FastAPI dependency for the JSON API."""
        if self.api_key is None:
            return
        self.check_throttle(request)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self.key_ok(token.strip()):
            self.throttle.failed(client_of(request))
            raise ServiceError(
                401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'"
            )

    def check_throttle(self, request: Request) -> None:
        """429 for an address that sent too many wrong keys lately."""
        wait = self.throttle.wait_s(client_of(request))
        if wait > 0:
            raise ServiceError(
                429,
                "too_many_failures",
                f"too many wrong keys from this address; try again in {wait:.0f} s",
                {"Retry-After": str(max(1, round(wait)))},
            )

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def new_session(self, now: float | None = None) -> str:
        sid = secrets.token_urlsafe(16)
        issued = str(int(time.time() if now is None else now))
        return f"{sid}.{issued}.{self._sign('session', f'{sid}.{issued}')}"

    def set_session(self, resp: Response, request: Request) -> None:
        resp.set_cookie(
            COOKIE,
            self.new_session(),
            httponly=True,
            samesite="strict",
            path="/",
            max_age=SESSION_S,
            secure=is_https(request),
        )

    def _parse(self, request: Request) -> tuple[str, float] | None:
        sid, _, rest = request.cookies.get(COOKIE, "").partition(".")
        issued, _, sig = rest.partition(".")
        if not sid or not issued.isdigit():
            return None
        if not hmac.compare_digest(sig.encode(), self._sign("session", f"{sid}.{issued}").encode()):
            return None
        return sid, float(issued)

    def session(self, request: Request) -> str | None:
        """The labeller id of a valid, unexpired session cookie that was not logged out, else None."""
        parsed = self._parse(request)
        if parsed is None:
            return None
        sid, issued = parsed
        if not 0 <= time.time() - issued <= SESSION_S:
            return None
        with self._lock:
            return None if sid in self._ended else sid

    def end_session(self, request: Request) -> tuple[str, float] | None:
        """Ends the request's session here; returns (its id, when it would expire) for the caller to
        write down, so that the logout holds after a restart too."""
        parsed = self._parse(request)
        if parsed is None:
            return None
        now = time.time()
        until = parsed[1] + SESSION_S
        with self._lock:
            self._ended = {s: t for s, t in self._ended.items() if t > now}
            self._ended[parsed[0]] = until
        return parsed[0], until

    def csrf_token(self, sid: str) -> str:
        return self._sign("csrf", sid)

    def csrf_ok(self, sid: str, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.csrf_token(sid).encode())


def is_https(request: Request) -> bool:
    """Served over https: directly, or behind a proxy that says so."""
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or proto == "https"
