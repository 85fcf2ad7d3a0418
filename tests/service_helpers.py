"""Shared helpers of the service tests: images, a service on 127.0.0.1 built from fakes, polling."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
from PIL import Image

from fakes import COLOURS, FakeEmbedder, FakeStudent, FakeTeacher, LocalServer
from icdistill.runner import Parts
from icdistill.service.app import create_app
from icdistill.service.config import ServeConfig

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPTIONS = list(COLOURS)
ZIP = {"content-type": "application/zip"}
SQLITE = {"content-type": "application/vnd.sqlite3"}


def colour_png(name: str, seed: int = 0, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(COLOURS[name]) + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def query_json(name: str, seed: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "image_b64": b64(colour_png(name, seed)),
        "prompt": "What colour is it?",
        "options": OPTIONS,
        **extra,
    }


@contextmanager
def running_service(
    tmp_path: Any, teacher: Any = None, student: Any = None, human: bool = False, **cfg: Any
) -> Iterator[tuple[httpx.Client, Any]]:
    """A real uvicorn server on a free loopback port, and an authorised client."""
    settings: dict[str, Any] = {
        "pool": str(tmp_path / "pool.sqlite"),
        "api_key": KEY,
        "gate": "always",
        "teacher": "fake",
    }
    if human:
        settings["teacher"] = "human"
    settings.update(cfg)
    config = ServeConfig(**settings)
    parts = Parts(student or FakeStudent(), teacher or FakeTeacher(), FakeEmbedder())
    app = create_app(config, parts)
    try:
        with LocalServer(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
            yield client, app
    finally:
        app.state.engine.close()


def wait_until(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
