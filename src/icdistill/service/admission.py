"""Back-pressure: the requests that queue for the model (predictions, hand-added demos, imports) are
admitted up to ``max_queued`` at once; one more is answered 503 with ``Retry-After`` before its body
is read, so a burst costs neither memory nor the latency of those already waiting. When the last
admitted request is done the service gives its freed memory back (``memory.trim``)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from icdistill.service.errors import error_response
from icdistill.service.memory import trim

QUEUED = {("POST", "/v1/predict"), ("POST", "/v1/demos"), ("POST", "/v1/import")}
TRIM_AFTER_S = 1.0  # idle this long: the heap's free pages go back to the system


class Admission:
    """ASGI middleware. ``service_s()``: the typical seconds one admitted request takes (for
    Retry-After: about when a place frees up)."""

    def __init__(self, app: ASGIApp, limit: int, service_s: Callable[[], float | None]) -> None:
        self.app = app
        self.limit = limit
        self.service_s = service_s
        self.active = 0
        self.refused = 0
        self._last_done = 0.0
        self._trim: asyncio.TimerHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) not in QUEUED:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            self.refused += 1
            wait = self.service_s() or 1.0
            retry = str(max(1, min(60, math.ceil(wait))))
            msg = f"the service is busy ({self.active} requests queued for the model); retry in {retry} s"
            await error_response(503, "overloaded", msg, {"Retry-After": retry})(scope, receive, send)
            return
        self.active += 1
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            self._last_done = time.monotonic()
            if self.active == 0:
                with contextlib.suppress(RuntimeError):
                    self._trim = asyncio.get_running_loop().call_later(TRIM_AFTER_S, self._trim_now)

    def _trim_now(self) -> None:
        self._trim = None
        if self.active == 0:
            asyncio.get_running_loop().run_in_executor(None, trim)
