"""Multipart forms parsed off the event loop: python-multipart parses a body in Python, a few tens of
milliseconds for a 6 MB image, and 32 of them at once held every other request (``/healthz`` p99 13x
its idle value). The body (already read by ``BodyLimit``) is parsed on a worker thread (``cpu``), in an event
loop of its own, with Starlette's parser and limits."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Message

from icdistill.service.cpu import off_loop


@dataclass(frozen=True)
class Upload:
    """A file field's name and bytes."""

    filename: str | None
    data: bytes


async def read_form(request: Request, **limits: Any) -> dict[str, str | Upload]:
    """The form's fields (the last value of each name): text as ``str``, files as ``Upload``."""
    body = await request.body()
    scope = dict(request.scope)

    async def parse() -> dict[str, str | Upload]:
        async def receive() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        out: dict[str, str | Upload] = {}
        async with Request(scope, receive).form(**limits) as form:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    out[name] = Upload(value.filename, await value.read())
                else:
                    out[name] = value
        return out

    return await off_loop(asyncio.run, parse())
