"""API keys (Bearer, compared in constant time), and the labelling page's login cookie and CSRF tokens."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import Request

from icdistill.service.errors import ServiceError

COOKIE = "icd_label_session"


class Auth:
    """``api_key=None`` means no authentication (only allowed on loopback, checked in ``ServeConfig``)."""

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key
        # signs session cookies and CSRF tokens; derived from the key so sessions survive restarts
        seed = api_key.encode() if api_key else secrets.token_bytes(32)
        self._secret = hashlib.sha256(b"icd-label-session\x00" + seed).digest()

    def key_ok(self, presented: str) -> bool:
        if self.api_key is None:
            return True
        return hmac.compare_digest(presented.encode(), self.api_key.encode())

    def require_key(self, request: Request) -> None:
        """FastAPI dependency for the JSON API."""
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self.key_ok(token.strip()):
            raise ServiceError(
                401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'"
            )

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        sid = secrets.token_urlsafe(16)
        return f"{sid}.{self._sign('session', sid)}"

    def session(self, request: Request) -> str | None:
        """The labeller id of a valid session cookie, else None."""
        raw = request.cookies.get(COOKIE, "")
        sid, _, sig = raw.partition(".")
        if not sid or not hmac.compare_digest(sig.encode(), self._sign("session", sid).encode()):
            return None
        return sid

    def csrf_token(self, sid: str) -> str:
        return self._sign("csrf", sid)

    def csrf_ok(self, sid: str, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.csrf_token(sid).encode())
