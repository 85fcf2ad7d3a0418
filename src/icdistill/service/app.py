"""``icd serve``: the FastAPI application and its uvicorn runner."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from icdistill.errors import ICDError, ServiceError
from icdistill.service.admission import Admission
from icdistill.service.auth import Auth
from icdistill.service.config import ServeConfig
from icdistill.service.engine import Engine
from icdistill.service.errors import error_response
from icdistill.service.guard import SameOrigin
from icdistill.service.label_page import label_router
from icdistill.service.metrics import Metrics
from icdistill.service.routes import api_router

log = logging.getLogger(__name__)


BIG_BODY = 1024 * 1024  # bodies this large are read a few at a time (``BodyLimit.readers``)


class BodyLimit:
    """Reads a request body up to a limit before the app sees it: a larger one gets 413, never a 500.

    At most ``readers`` large bodies are read at once; the others wait with their sockets paused
    (uvicorn stops reading a request the app does not read). Each chunk read costs the event loop a
    callback, and 32 uploads of 6 MB at once queued other clients' requests behind thousands of them."""

    def __init__(self, app: ASGIApp, limit: int, import_limit: int, readers: int = 4) -> None:
        self.app = app
        self.limit = limit
        self.import_limit = import_limit
        self.readers = readers
        self._gate: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.import_limit if scope["path"] == "/v1/import" else self.limit
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await error_response(400, "bad_request", "invalid Content-Length")(scope, receive, send)
                    return
                if declared > limit:
                    await self._too_large(scope, receive, send, limit)
                    return
                if declared >= BIG_BODY:
                    if self._gate is None:
                        self._gate = asyncio.Semaphore(self.readers)
                    async with self._gate:
                        try:  # a slow sender must not hold a place: at least 256 KB/s
                            async with asyncio.timeout(max(30.0, declared / 256_000)):
                                body = await self._read(scope, receive, send, limit)
                        except TimeoutError:
                            await error_response(408, "body_timeout", "the request body came too slowly")(
                                scope, receive, send
                            )
                            return
                    if body is not None:
                        await self._forward(scope, receive, send, body)
                    return
        body = await self._read(scope, receive, send, limit)
        if body is not None:
            await self._forward(scope, receive, send, body)

    async def _read(self, scope: Scope, receive: Receive, send: Send, limit: int) -> bytes | None:
        """The whole body, or None when it was refused (413, answered here) or the client left."""
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(scope, receive, send, limit)
                return None
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return b"".join(chunks)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        resp = error_response(413, "body_too_large", f"request body over the limit of {limit} bytes")
        await resp(scope, receive, send)


def create_app(cfg: ServeConfig, parts: Any = None) -> FastAPI:
    """The service. ``parts`` (student, teacher, embedder objects) replaces the specs in ``cfg`` (tests)."""
    engine = Engine(cfg, parts)
    auth = Auth(cfg.api_key, engine.ended_sessions)
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.aclose()

    # FastAPIOffline serves the /docs page's Swagger UI from the package: no CDN, works offline
    app = FastAPIOffline(
        title="icd serve",
        version="0.1.0",
        description=(
            "Online in-context distillation as a service: the student answers at once; uncertain queries "
            "go to the teacher (a model, or a person on /label) in the background, and each answer joins "
            "the demonstration pool. Send `Authorization: Bearer <key>`."
        ),
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.metrics = metrics

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
        return error_response(exc.status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(422, "invalid_field", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(ICDError)
    async def _icd(request: Request, exc: ICDError) -> JSONResponse:
        log.warning("request failed: %s", exc)
        return error_response(503, "service_error", str(exc))

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, "internal_error", "internal error; see the server log")

    app.include_router(api_router(engine, auth, metrics))
    app.include_router(label_router(engine, auth))
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes, import_limit=cfg.max_import_bytes)
    # before the body is read: a request refused for a full queue costs nothing
    app.add_middleware(Admission, limit=cfg.max_queued, service_s=engine.typical_seconds)
    app.add_middleware(SameOrigin, bound_host=cfg.host)  # outermost: refused before the body is read
    return app


def serve(cfg: ServeConfig) -> None:
    from icdistill.service.server import run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(cfg)
    auth = "no auth (loopback only)" if cfg.api_key is None else "Bearer key required"
    log.info("icd serve on http://%s:%d (%s); label page /label, API docs /docs", cfg.host, cfg.port, auth)
    run_server(app, cfg, log_level="info")
