"""``icd serve-model``: any Student backend behind an OpenAI-compatible Chat Completions server.

Optional server-side fault injection (``FaultPlan``) for tests and chaos drills of API clients.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import os
import socket
import sys
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

from icdistill.errors import ICDError, SpecError
from icdistill.models.openai_request import parse_prompt
from icdistill.protocols import Student
from icdistill.types import Demo, Prediction, Query

log = logging.getLogger(__name__)

FAULT_KINDS = ("slow", "500", "429", "garbage", "wrong_n")
MAX_N = 128
MAX_BODY_BYTES = 32 * 2**20  # a request of a few dozen demo images
MAX_IMAGE_PIXELS = 40_000_000  # per image, checked from the header before decoding
LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "ICD_SERVE_API_KEY"


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
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    """An error in OpenAI's shape, so every OpenAI client reads its message."""
    body = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status)


def _decode_image(url: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    if not url.startswith("data:") or ";base64," not in url:
        raise _BadRequest("only base64 data URIs are supported for images (this server has no network)")
    try:
        img = Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1], validate=True)))
        w, h = img.size  # from the header: a huge image is refused before it is decoded
        if w * h > max_pixels:
            raise _BadRequest(
                f"image of {w}x{h} pixels is larger than this server's limit of {max_pixels} pixels"
            )
        img.load()
    except Image.DecompressionBombError as e:
        raise _BadRequest(f"image is larger than this server's limit of {max_pixels} pixels") from e
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
        raise _BadRequest(f"image is not a decodable base64 PNG/JPEG ({type(e).__name__})") from e
    return img


def _split_content(content: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image | None, str]:
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
                image = _decode_image(str(url), max_pixels)
        else:
            raise _BadRequest(f"unsupported content part {kind!r}")
    return image, "\n".join(texts)


def parse_messages(
    messages: Any, options: Any = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[Query, list[Demo]]:
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
            image, text = _split_content(prev.get("content"), max_pixels)
            _, answer = _split_content(cur.get("content"), max_pixels)
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
    image, text = _split_content(turns[-1].get("content"), max_pixels)
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
    """OpenAI-shaped logprobs: a classification answer is one "token" whose alternatives are the options.

    An open answer gets one entry per word when the model's token count matches its words; otherwise
    the server does not know the token texts, and reports the whole answer as one entry with the
    answer's log-probability. No alternatives are invented: only what the model reported is listed.
    """
    probs = pred.option_probs() if query.options else {}
    if probs:
        ranked = sorted(probs.items(), key=lambda kv: -kv[1])[:top]
        lp = math.log(max(probs.get(answer, 0.0), 1e-300))
        alts = [_token(o, math.log(max(p, 1e-300))) for o, p in ranked]
        return {"content": [_token(answer, lp) | {"top_logprobs": alts}]}
    if not pred.token_logprobs:
        return None
    words = answer.split()
    if len(words) == len(pred.token_logprobs):
        pieces = [
            (w if i == 0 else " " + w, float(lp))
            for i, (w, lp) in enumerate(zip(words, pred.token_logprobs, strict=True))
        ]
    else:
        pieces = [(answer, float(sum(pred.token_logprobs)))]
    content = []
    for text, lp in pieces:
        entry = _token(text, lp)
        entry["top_logprobs"] = [_token(text, lp)] if top else []
        content.append(entry)
    return {"content": content}


def _int_field(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _BadRequest(f"{key} must be an integer in {low}..{high}, got {value!r}", key)
    return value


def _temperature(body: dict[str, Any]) -> float:
    value = body.get("temperature")
    if value is None:
        return 1.0  # the OpenAI default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2:
        raise _BadRequest(f"temperature must be a number in 0..2, got {value!r}", "temperature")
    return float(value)


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The body, or None once it grows past ``limit`` bytes (stopping there, whatever Content-Length says)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _predict(student: Student, query: Query, demos: Sequence[Demo]) -> Prediction:
    """``student.predict``, dropping what a learning student keeps for a run log to replay (its
    events): no log here, and a long-lived server must not keep one event per request."""
    try:
        return student.predict(query, demos)
    finally:
        drain = getattr(student, "drain_events", None)
        if drain is not None:
            drain()


def create_app(
    student: Student,
    faults: FaultPlan | None = None,
    *,
    ignore_n: bool = False,
    model_name: str | None = None,
    seed: int = 0,
    served_models: Sequence[str] | None = None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> FastAPI:
    """An OpenAI-compatible app serving ``student``.

    ``served_models``: the model names answered (others get 404 as from OpenAI); None answers any
    name (test servers stand in for models of other names). ``api_key``: required as a Bearer token.
    ``ignore_n`` mimics servers that always return one choice. ``app.state.requests`` counts chat
    requests (faulty ones included).
    """
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    name = model_name or getattr(student, "name", "student")
    app = FastAPI(title=f"icdistill serve-model: {name}")
    app.state.faults = faults or FaultPlan()
    app.state.requests = 0
    rng = np.random.default_rng(seed)
    # Student backends are not assumed thread-safe: one prediction at a time.
    predict_lock = asyncio.Lock()
    names = list(dict.fromkeys(served_models)) if served_models is not None else None

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error(404, f"no route {request.method} {request.url.path}", code="not_found")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "the request does not match the API")

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Response:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(
                401, "missing or incorrect API key (Authorization: Bearer <key>)", code="invalid_api_key"
            )
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "icdistill"} for m in (names or [name])
            ],
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
        raw = await _read_limited(request, max_body_bytes)
        if raw is None:
            return _error(413, f"request body is larger than this server's limit of {max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _error(400, "you must provide a model parameter", param="model")
        if names is not None and model not in names:
            return _error(
                404,
                f"The model `{model}` does not exist; this server serves {', '.join(names)}",
                code="model_not_found",
                param="model",
            )
        if body.get("stream"):
            return _error(400, "stream=true is not supported", param="stream")
        try:
            query, demos = parse_messages(body.get("messages"), body.get("options"), max_image_pixels)
            n = _int_field(body, "n", 1, 1, MAX_N)
            top = _int_field(body, "top_logprobs", 0, 0, 20)
            seed = None if body.get("seed") is None else _int_field(body, "seed", 0, 0, 2**63 - 1)
            temperature = _temperature(body)
            sample_open = query.options is None and n > 1 and temperature > 0
            if sample_open and not callable(getattr(student, "sample", None)):
                raise _BadRequest(
                    "n > 1 with temperature > 0 needs options: this backend answers open questions "
                    "greedily and would return n copies of one answer",
                    "n",
                )
        except _BadRequest as e:
            return _error(400, str(e), param=e.param)
        async with predict_lock:
            try:
                pred = await asyncio.to_thread(_predict, student, query, demos)
            except Exception:  # the client must see a server error, not a dropped connection
                ref = uuid.uuid4().hex[:12]
                log.exception("student failed on request %s", ref)  # the details stay in the server log
                return _error(
                    500, f"the model failed on this request (server log reference {ref})", "server_error"
                )
        if query.options is None and not pred.answer.strip():
            return _error(
                422,
                "the model gave an empty answer to this open question",
                "server_error",
                code="empty_answer",
            )
        sampler = np.random.default_rng(seed) if seed is not None else rng
        if sample_open:
            # real samples from the backend (e.g. local:smollm2), not copies of the greedy answer
            draw_seed = seed if seed is not None else int(sampler.integers(2**31))
            async with predict_lock:
                answers = await asyncio.to_thread(student.sample, query, demos, n, temperature, draw_seed)
        else:
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
                "model": model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    return app


def _say(text: str) -> None:
    print(f"icd serve-model: {text}", file=sys.stderr, flush=True)


def check_port(host: str, port: int) -> None:
    """Fail before a slow model load when the address cannot be bound (in use, no permission)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ICDError(
                f"cannot serve on {host}:{port}: {e.strerror or e} (is another server running?)"
            ) from e


def main(
    spec: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    faults: str | None = None,
    *,
    ignore_n: bool = False,
    seed: int = 0,
    api_key: str | None = None,
) -> None:
    """Resolve ``spec`` as a student, warm it up, and serve it until interrupted.

    The model is served under its backend name and under ``spec``. Beyond loopback an API key is
    required (``api_key`` or $ICD_SERVE_API_KEY): the server runs a model on anyone's request.
    """
    import uvicorn

    from icdistill.conformance import sample_queries
    from icdistill.models.registry import ModelContext, check_spec, resolve_student

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and host not in LOOPBACK:
        raise ICDError(
            f"serving on {host} (beyond this machine) needs an API key: pass --api-key or set {API_KEY_ENV}"
        )
    # mistakes in the command line fail before a slow model load
    plan = FaultPlan.parse(faults) if faults else None
    check_spec(spec, "student", purpose="served by icd serve-model")
    check_port(host, port)
    t0 = time.perf_counter()
    _say(f"loading {spec} (a first load takes tens of seconds)...")
    student = resolve_student(spec, ModelContext(seed=seed))
    # Backends load weights lazily; pay that before listening so first clients don't time out.
    student.predict(sample_queries()[0], [])
    served = [getattr(student, "name", spec), spec]
    shown = f"[{host}]" if ":" in host else host
    _say(
        f"loaded in {time.perf_counter() - t0:.0f}s; serving {' and '.join(dict.fromkeys(served))} at "
        f"http://{shown}:{port}/v1 (POST chat/completions, GET models); Ctrl-C stops"
    )
    app = create_app(
        student,
        plan,
        ignore_n=ignore_n,
        model_name=served[0],
        seed=seed,
        served_models=served,
        api_key=api_key,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")
