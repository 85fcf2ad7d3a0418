"""``icd serve-model``: any Student backend behind an OpenAI-compatible Chat Completions server.

Optional server-side fault injection (``FaultPlan``) for tests and chaos drills of API clients.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError

from icdistill.models.openai_api import parse_prompt
from icdistill.protocols import Student
from icdistill.types import Demo, Prediction, Query, SpecError

log = logging.getLogger(__name__)

FAULT_KINDS = ("slow", "500", "429", "garbage", "wrong_n")
MAX_N = 128


@dataclass(frozen=True)
class Fault:
    kind: str  # one of FAULT_KINDS
    arg: float = 0.0  # seconds for slow (sleep) and 429 (Retry-After)


class FaultPlan:
    """Faults consumed one per chat-completion request, in order; afterwards the server is healthy.

    Text form: comma-separated ``slow:S``, ``500``, ``429:N`` (Retry-After N s), ``garbage``
    (200 with a malformed JSON body), ``wrong_n`` (one choice fewer than asked); ``KIND*K`` repeats.
    """

    def __init__(self, faults: Sequence[Fault] = ()) -> None:
        self._queue = deque(faults)
        self._lock = threading.Lock()
        self.served: list[Fault] = []

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        faults: list[Fault] = []
        for raw in text.split(","):
            item = raw.strip()
            if not item:
                continue
            item, _, times = item.partition("*")
            kind, _, arg = item.partition(":")
            kind = kind.strip().lower()
            if kind not in FAULT_KINDS:
                raise SpecError(f"unknown fault {raw.strip()!r}: expected one of {', '.join(FAULT_KINDS)}")
            try:
                value = float(arg) if arg else (1.0 if kind in ("slow", "429") else 0.0)
                count = int(times) if times else 1
            except ValueError as e:
                raise SpecError(f"fault {raw.strip()!r} is not valid: {e}") from e
            faults.extend([Fault(kind, value)] * count)
        return cls(faults)

    def next(self) -> Fault | None:
        with self._lock:
            if not self._queue:
                return None
            fault = self._queue.popleft()
            self.served.append(fault)
            return fault

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)


class _BadRequest(Exception):
    pass


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _decode_image(url: str) -> Image.Image:
    if not url.startswith("data:") or ";base64," not in url:
        raise _BadRequest("only base64 data URIs are supported for images (this server has no network)")
    try:
        img = Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1], validate=True)))
        img.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
        raise _BadRequest(f"image is not a decodable base64 PNG/JPEG: {e}") from e
    return img


def _split_content(content: Any) -> tuple[Image.Image | None, str]:
    """(first image, joined text) of a message's content (a string or a list of parts)."""
    if isinstance(content, str):
        return None, content
    if not isinstance(content, list):
        raise _BadRequest("message content must be a string or a list of parts")
    image, texts = None, []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if image is None:
                image = _decode_image(str(url))
        else:
            raise _BadRequest(f"unsupported content part {kind!r}")
    return image, "\n".join(texts)


def parse_messages(messages: Any, options: Any = None) -> tuple[Query, list[Demo]]:
    """Earlier user/assistant pairs become demos, the last user message the query.

    Options come from the request's non-standard ``options`` field, else from an
    "Answer with one of: ..." line of the last user message; otherwise the answer is open.
    """
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages must be a non-empty list")
    turns = [m for m in messages if isinstance(m, dict) and m.get("role") in ("user", "assistant")]
    if not turns or turns[-1].get("role") != "user":
        raise _BadRequest("the last message must be a user message")
    demos: list[Demo] = []
    for prev, cur in zip(turns[:-1], turns[1:-1], strict=False):
        if prev.get("role") == "user" and cur.get("role") == "assistant":
            image, text = _split_content(prev.get("content"))
            _, answer = _split_content(cur.get("content"))
            prompt, _ = parse_prompt(text)
            demos.append(
                Demo(
                    id=len(demos) + 1,
                    query_id=f"demo-{len(demos)}",
                    image=image,
                    prompt=prompt,
                    answer=answer,
                )
            )
    image, text = _split_content(turns[-1].get("content"))
    prompt, parsed = parse_prompt(text)
    if options is not None:
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            raise _BadRequest("options must be a non-empty list of strings")
        parsed = tuple(options)
    return Query(id=f"req-{uuid.uuid4().hex[:12]}", image=image, prompt=prompt, options=parsed), demos


def _words(text: str) -> int:
    return len(text.split())


def _prompt_tokens(messages: list[Any]) -> int:
    total = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            total += _words(content)
        elif isinstance(content, list):
            total += sum(_words(str(p.get("text", ""))) for p in content if isinstance(p, dict))
    return total


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _choose(
    pred: Prediction, query: Query, n: int, temperature: float, rng: np.random.Generator
) -> list[str]:
    """n answers: sampled from the option probabilities with temperature, else the prediction repeated."""
    probs = pred.option_probs() if query.options else {}
    if n == 1 or not probs or temperature <= 0:
        return [pred.answer] * n
    keys = list(probs)
    logp = np.log(np.maximum(np.array([probs[k] for k in keys]), 1e-300)) / temperature
    p = np.exp(logp - logp.max())
    p /= p.sum()
    return [keys[i] for i in rng.choice(len(keys), size=n, p=p)]


def _logprobs(pred: Prediction, query: Query, answer: str, top: int) -> dict[str, Any] | None:
    """OpenAI-shaped logprobs: a classification answer is one "token" whose alternatives are the options."""
    probs = pred.option_probs() if query.options else {}
    if probs:
        ranked = sorted(probs.items(), key=lambda kv: -kv[1])[:top]
        lp = math.log(max(probs.get(answer, 0.0), 1e-300))
        alts = [_token(o, math.log(max(p, 1e-300))) for o, p in ranked]
        return {"content": [_token(answer, lp) | {"top_logprobs": alts}]}
    if not pred.token_logprobs:
        return None
    words = answer.split()
    content = []
    for i, lp in enumerate(pred.token_logprobs):
        text = words[i] if len(words) == len(pred.token_logprobs) else (answer if i == 0 else "")
        entry = _token(text, float(lp))
        rest = max(0.0, 1.0 - math.exp(lp))
        # Spread the rest of the mass over anonymous alternatives so clients can compute an entropy.
        others = [_token(f"<alt{j}>", math.log(rest / (top - 1))) for j in range(top - 1)] if rest > 0 else []
        entry["top_logprobs"] = ([_token(text, float(lp))] + others)[:top] if top else []
        content.append(entry)
    return {"content": content}


def create_app(
    student: Student,
    faults: FaultPlan | None = None,
    *,
    ignore_n: bool = False,
    model_name: str | None = None,
    seed: int = 0,
) -> FastAPI:
    """An OpenAI-compatible app serving ``student``.

    ``ignore_n`` mimics servers that always return one choice. ``app.state.requests`` counts chat
    requests (faulty ones included).
    """
    name = model_name or getattr(student, "name", "student")
    app = FastAPI(title=f"icdistill serve-model: {name}")
    app.state.faults = faults or FaultPlan()
    app.state.requests = 0
    rng = np.random.default_rng(seed)
    # Student backends are not assumed thread-safe: one prediction at a time.
    predict_lock = asyncio.Lock()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "icdistill"}],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        app.state.requests += 1
        fault = app.state.faults.next()
        if fault is not None:
            if fault.kind == "slow":
                await asyncio.sleep(fault.arg)
            elif fault.kind == "500":
                return _error(500, "injected server error", "server_error")
            elif fault.kind == "429":
                resp = _error(429, "injected rate limit", "rate_limit_error")
                resp.headers["Retry-After"] = f"{fault.arg:g}"
                return resp
            elif fault.kind == "garbage":
                return Response(b'{"id": "chatcmpl-garbage", "choices": [', media_type="application/json")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        if body.get("stream"):
            return _error(400, "stream=true is not supported")
        try:
            query, demos = parse_messages(body.get("messages"), body.get("options"))
            n = 1 if body.get("n") is None else int(body["n"])
            t = body.get("temperature")
            temperature = 1.0 if t is None else float(t)  # the OpenAI default
            top = int(body.get("top_logprobs") or 0)
            if not 1 <= n <= MAX_N or not 0 <= top <= 20:
                raise _BadRequest(f"n must be in 1..{MAX_N} and top_logprobs in 0..20")
        except (_BadRequest, TypeError, ValueError) as e:
            return _error(400, str(e))
        async with predict_lock:
            try:
                pred = await asyncio.to_thread(student.predict, query, demos)
            except Exception as e:  # the client must see a server error, not a dropped connection
                return _error(500, f"student failed: {type(e).__name__}: {e}", "server_error")
        sampler = np.random.default_rng(int(body["seed"])) if body.get("seed") is not None else rng
        answers = _choose(pred, query, n, temperature, sampler)
        if ignore_n:
            answers = answers[:1]
        if fault is not None and fault.kind == "wrong_n":
            answers = answers[:-1]
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": a},
                "logprobs": _logprobs(pred, query, a, top) if body.get("logprobs") else None,
                "finish_reason": "stop",
            }
            for i, a in enumerate(answers)
        ]
        prompt_tokens = _prompt_tokens(body["messages"])
        completion_tokens = sum(_words(a) for a in answers)
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": str(body.get("model") or name),
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    return app


def main(
    spec: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    faults: str | None = None,
    *,
    ignore_n: bool = False,
    seed: int = 0,
) -> None:
    """Resolve ``spec`` as a student, warm it up, and serve it until interrupted."""
    import uvicorn

    from icdistill.conformance import sample_queries
    from icdistill.models.registry import ModelContext, resolve_student

    plan = FaultPlan.parse(faults) if faults else None  # a typo fails before a slow model load
    student = resolve_student(spec, ModelContext(seed=seed))
    # Backends load weights lazily; pay that before listening so first clients don't time out.
    log.info("warming up %s", spec)
    student.predict(sample_queries()[0], [])
    app = create_app(student, plan, ignore_n=ignore_n, model_name=getattr(student, "name", spec), seed=seed)
    uvicorn.run(app, host=host, port=port, log_level="info")
