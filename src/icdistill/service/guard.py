"""Browser-facing defences that hold with or without an API key: a loopback server answers only to
loopback host names (DNS rebinding), and no page of another origin may write (cross-site requests).

A browser sends ``Origin`` (and ``Sec-Fetch-Site``) with every cross-origin POST, ``mode: "no-cors"``
included; clients that are not browsers (curl, httpx) send neither and pass.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from icdistill.service.config import is_loopback
from icdistill.service.errors import error_response

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def host_name(netloc: str) -> str:
    """``"[::1]:8080"`` -> ``"::1"``, ``"Example.org:80"`` -> ``"example.org"``."""
    try:
        return (urlsplit(f"//{netloc}").hostname or "").lower()
    except ValueError:
        return ""


def refusal(scope: Scope, bound_host: str) -> tuple[int, str, str] | None:
    """Why this request is refused (status, code, message), or None.

    A proxy in front names the public host in ``X-Forwarded-Host``: a browser page cannot send that
    header without a CORS preflight, which this server never grants, so it is trusted."""
    forwarded = (_header(scope, b"x-forwarded-host") or "").split(",")[0].strip()
    host = forwarded or _header(scope, b"host") or ""
    if not forwarded and is_loopback(bound_host) and host_name(host) not in LOOPBACK_NAMES:
        return 421, "wrong_host", "this server answers to its loopback address only (Host header)"
    if scope["method"] in SAFE_METHODS:
        return None
    site = _header(scope, b"sec-fetch-site")
    if site is not None:  # the browser's own word on who sent it
        if site in ("same-origin", "none"):
            return None
        return 403, "cross_origin", "a page of another site may not write to this server"
    origin = _header(scope, b"origin")
    if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
        return 403, "cross_origin", "a page of another origin may not write to this server"
    return None


class SameOrigin:
    """ASGI middleware: refuses wrong ``Host`` headers on a loopback server, and writes from other origins."""

    def __init__(self, app: ASGIApp, bound_host: str) -> None:
        self.app = app
        self.bound_host = bound_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        why = refusal(scope, self.bound_host) if scope["type"] == "http" else None
        if why is None:
            await self.app(scope, receive, send)
            return
        await error_response(*why)(scope, receive, send)
