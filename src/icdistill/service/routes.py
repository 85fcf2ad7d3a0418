"""The JSON API: predict, queries, demos, export/import, stats, metrics, health."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import ValidationError

from icdistill.errors import ServiceError
from icdistill.service.auth import Auth
from icdistill.service.cpu import off_loop
from icdistill.service.engine import Engine
from icdistill.service.errors import bad_request, unprocessable
from icdistill.service.forms import Upload, read_form
from icdistill.service.images import decode_b64_image, decode_image
from icdistill.service.metrics import CONTENT_TYPE, Metrics
from icdistill.service.schemas import PREDICT_BODY, DemoIn, LabelIn, PredictJSON, QueryOut
from icdistill.service.validate import check_options, check_prompt, parse_json

FORM_FIELDS = {"image", "prompt", "options", "wait", "label"}
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}
IMPORT_TYPES = {"application/zip", "application/vnd.sqlite3", "application/x-sqlite3", "application/octet-stream"}


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ())) or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def _bool(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise unprocessable(f"{name} must be true or false, got {value!r}")


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _json_body(request: Request) -> Any:
    ctype = _content_type(request)
    if ctype != "application/json":
        raise ServiceError(
            415, "unsupported_media_type", f"send application/json, not {ctype or 'no content type'}"
        )
    body = await request.body()
    # a multi-megabyte body is parsed off the event loop, so /healthz never waits for it
    return parse_json(body) if len(body) < 256 * 1024 else await off_loop(parse_json, body)


def api_router(engine: Engine, auth: Auth, metrics: Metrics) -> APIRouter:
    cfg = engine.cfg
    r = APIRouter()

    async def started() -> None:
        await engine.start()  # resumes interrupted teacher calls even when uvicorn runs without lifespan

    protected = [Depends(auth.require_key), Depends(started)]

    async def predict_from_form(request: Request) -> dict[str, Any]:
        try:  # parsed off the event loop: a 6 MB body costs tens of milliseconds of Python
            form = await read_form(
                request, max_files=2, max_fields=len(FORM_FIELDS) + 2, max_part_size=cfg.max_body_bytes
            )
        except Exception as e:  # python-multipart raises several types on malformed bodies
            raise bad_request(f"malformed multipart body: {e}", "bad_multipart") from e
        unknown = set(form.keys()) - FORM_FIELDS
        if unknown:
            raise unprocessable(f"unknown field(s) {sorted(unknown)}; expected {sorted(FORM_FIELDS)}")
        image = form.get("image")
        if not isinstance(image, Upload):
            raise unprocessable("the multipart field 'image' (a file) is required")
        try:
            prompt = check_prompt(form.get("prompt"))
        except ValueError as e:
            raise unprocessable(f"prompt: {e}") from e
        options = None
        raw_opts = form.get("options")
        if isinstance(raw_opts, str) and raw_opts.strip():
            try:
                options = check_options(parse_json(raw_opts, "options"))
            except ServiceError as e:
                raise unprocessable(f"options: {e.message}") from e
            except ValueError as e:
                raise unprocessable(f"options: {e}") from e
        img = await off_loop(decode_image, image.data, cfg.max_pixels)
        label = form.get("label")
        wait = form.get("wait")
        return {
            "image": img,
            "prompt": prompt,
            "options": options,
            "label": label if isinstance(label, str) and label else None,
            "wait": _bool(wait, "wait") if isinstance(wait, str) else False,
        }

    @r.post(
        "/v1/predict",
        response_model=QueryOut,
        response_model_exclude_none=True,
        dependencies=protected,
        openapi_extra=PREDICT_BODY,
        summary="Answer an image query now; uncertain ones go to the teacher in the background",
    )
    async def predict(request: Request, wait: bool | None = Query(None)) -> dict[str, Any]:
        ctype = _content_type(request)
        if ctype == "multipart/form-data":
            args = await predict_from_form(request)
        elif ctype == "application/json":
            try:
                body = PredictJSON.model_validate(await _json_body(request))
            except ValidationError as e:
                raise unprocessable(_validation_message(e)) from e
            img = await off_loop(decode_b64_image, body.image_b64, cfg.max_pixels)
            args = {
                "image": img,
                "prompt": body.prompt.strip(),
                "options": body.options,
                "label": body.label,
                "wait": body.wait,
            }
        else:
            raise ServiceError(
                415,
                "unsupported_media_type",
                f"send multipart/form-data (image file) or application/json (image_b64), not {ctype or 'nothing'}",
            )
        if wait is not None:
            args["wait"] = wait
        return await engine.predict(**args)

    @r.get(
        "/v1/queries/{query_id}",
        response_model=QueryOut,
        response_model_exclude_none=True,
        dependencies=protected,
    )
    async def get_query(query_id: str) -> dict[str, Any]:
        return await engine.query(query_id)

    @r.post(
        "/v1/queries/{query_id}/label",
        response_model=QueryOut,
        response_model_exclude_none=True,
        dependencies=protected,
        summary="A person's label for a queued query (what the /label page submits)",
    )
    async def label_query(query_id: str, request: Request) -> dict[str, Any]:
        try:
            body = LabelIn.model_validate(await _json_body(request))
        except ValidationError as e:
            raise unprocessable(_validation_message(e)) from e
        return await engine.submit_label(query_id, body.label, "api")

    @r.get("/v1/demos", dependencies=protected)
    async def list_demos(
        offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500)
    ) -> dict[str, Any]:
        return await engine.list_demos(offset, limit)

    @r.get("/v1/demos/{demo_id}", dependencies=protected)
    async def get_demo(demo_id: int) -> dict[str, Any]:
        return await engine.get_demo(demo_id)

    @r.delete("/v1/demos/{demo_id}", status_code=204, dependencies=protected)
    async def delete_demo(demo_id: int) -> Response:
        await engine.delete_demo(demo_id)
        return Response(status_code=204)

    @r.post("/v1/demos", status_code=201, dependencies=protected, summary="Add a labelled example by hand")
    async def add_demo(request: Request) -> dict[str, Any]:
        try:
            body = DemoIn.model_validate(await _json_body(request))
        except ValidationError as e:
            raise unprocessable(_validation_message(e)) from e
        img = await off_loop(decode_b64_image, body.image_b64, cfg.max_pixels)
        return await engine.add_demo(img, body.model_dump(exclude={"image_b64"}))

    @r.get("/v1/export", dependencies=protected, summary="The pool as a zip: demos.jsonl + images/")
    async def export() -> Response:
        data = await engine.export_archive()
        return Response(
            data,
            media_type="application/zip",
            headers={"Content-Disposition": 'attachment; filename="icd-pool.zip"'},
        )

    @r.post(
        "/v1/import",
        dependencies=protected,
        summary="Add demos from a /v1/export zip or an icd run pool.sqlite (raw body)",
    )
    async def import_pool(request: Request) -> dict[str, Any]:
        ctype = _content_type(request)
        if ctype not in IMPORT_TYPES:
            # text/plain and the form types are what a page of another site may send without asking
            raise ServiceError(
                415, "unsupported_media_type", f"send the archive as one of {sorted(IMPORT_TYPES)}, not {ctype or 'nothing'}"
            )
        data = await request.body()
        if not data:
            raise bad_request("empty body: send the archive bytes", "bad_archive")
        return await engine.import_archive(data)

    @r.get("/v1/stats", dependencies=protected)
    async def stats() -> dict[str, Any]:
        return engine.stats()

    @r.get("/metrics", dependencies=protected, summary="Prometheus text format")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @r.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    return r
