"""A loopback OpenAI-compatible teacher that answers the colour of the image (``colour_folder`` data)
and records what it is asked: which images (by hash), how many requests were open at once, and
optionally holds every request until the test releases it. Shared by the stream-driver tests."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import threading
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from PIL import Image

from fakes import COLOURS


def image_key(image: Image.Image) -> str:
    """How the server names an image: the hash of the RGB pixels it receives (PNG, lossless)."""
    return hashlib.sha1(np.asarray(image.convert("RGB")).tobytes()).hexdigest()[:16]


def _last_image(body: dict[str, Any]) -> Image.Image:
    for part in reversed(body["messages"][-1]["content"]):
        if part.get("type") == "image_url":
            uri = part["image_url"]["url"]
            return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    raise ValueError("no image in the last message")


def colour_of(image: Image.Image) -> str:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda c: float(np.linalg.norm(rgb - np.array(COLOURS[c]))))


class SlowTeacher:
    """``app``: the FastAPI app. ``hold()``: later requests wait until ``release()``; ``latency``:
    seconds each answer waits (an event-driven test leaves it 0). ``asked``: image keys in arrival
    order; ``answered``: image keys whose answer was sent; ``max_open``: most requests open at once."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.asked: list[str] = []
        self.answered: list[str] = []
        self.open = 0
        self.max_open = 0
        self._gate = threading.Event()
        self._gate.set()
        self._lock = threading.Lock()
        self._held: set[int] | None = None  # None: hold() holds every request
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._chat)
        self.app.get("/v1/models")(self._models)

    def hold(self) -> None:
        self._gate.clear()

    def hold_arrivals(self, indices: set[int]) -> None:
        """Hold only the requests that arrive as these (0-based) in order; the others answer at once."""
        self._held = set(indices)
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def _models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "colour-expert", "object": "model"}]}

    async def _chat(self, body: dict[str, Any]) -> JSONResponse:
        image = _last_image(body)
        key = image_key(image)
        with self._lock:
            arrival = len(self.asked)
            self.asked.append(key)
            self.open += 1
            self.max_open = max(self.max_open, self.open)
        try:
            if not self._gate.is_set() and (self._held is None or arrival in self._held):
                await asyncio.to_thread(self._gate.wait, 600)
            if self.latency:
                await asyncio.sleep(self.latency)
            answer = colour_of(image)
            n = int(body.get("n", 1))
            choices = [
                {"index": i, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
                for i in range(n)
            ]
            return JSONResponse(
                {
                    "object": "chat.completion",
                    "choices": choices,
                    "usage": {"prompt_tokens": 10, "completion_tokens": 1},
                }
            )
        finally:
            with self._lock:
                self.open -= 1
                self.answered.append(key)
