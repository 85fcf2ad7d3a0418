"""``openai:<model>@<base_url>``: a teacher and student over any OpenAI-compatible Chat Completions API.

Works with OpenAI (GPT-4o), vLLM, Ollama, llama.cpp and ``icd serve-model``; async, retried, cached.
This module holds the model (sampling, predicting, accounting) and its spec; the jobs it builds on are
one module each: ``openai_request`` (request building), ``openai_transport`` (HTTP, retries, the
response cache per sample), ``openai_parse`` (response parsing), ``openai_quirks`` (per-server
quirks), ``openai_prices`` (prices); the cache itself is ``response_cache``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from icdistill.errors import SpecError, TeacherError, TeacherRefused
from icdistill.models.openai_parse import (
    _best,
    _Parsing,
    closest_option,
    error_info,
    normalise,
    vote_scores,
)
from icdistill.models.openai_prices import is_paid_endpoint, known_price
from icdistill.models.openai_quirks import _LogprobsRejected, _Quirks, is_reasoning_model
from icdistill.models.openai_request import _Requests
from icdistill.models.openai_transport import _LoopThread, _Transport, key_hint
from icdistill.models.readahead import ReadAhead
from icdistill.models.registry import ModelContext, Spec
from icdistill.models.response_cache import CACHE_FILE, ResponseCache, default_cache_dir
from icdistill.types import Demo, Prediction, Query, TeacherResponse, Usage

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TEMPERATURE = 0.7


class OpenAIChatModel(_Requests, _Parsing, _Quirks, _Transport):
    """Teacher (``sample``) and Student (``predict``) over an OpenAI-compatible chat API.

    ``usage`` accumulates every request of this object; each ``TeacherResponse.usage`` covers only
    its own call. ``calls`` counts real HTTP answers: a fully cached call reports ``calls == 0``
    (see ``cache_hits``). ``faults`` counts failed attempts (timeouts, 429, 5xx, malformed replies,
    wrong number of choices) and failed samples (refusals, filtered or truncated answers).

    Learnt once per object and then kept: the server ignores or refuses ``n`` (one request per
    sample), rejects logprobs (votes instead), or the model takes ``max_completion_tokens`` and only
    its default temperature (OpenAI reasoning models; known ones get this from the start).
    """

    def __init__(
        self,
        model: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        key_env: str | None = None,
        timeout: float | None = None,
        concurrency: int = 4,
        retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        temperature: float | None = DEFAULT_TEMPERATURE,
        max_tokens: int | None = None,
        token_param: str = "auto",
        use_n: bool = True,
        deadline: float | None = None,
        reasoning_effort: str | None = None,
        run_seed: int = 0,
        logprobs: bool = True,
        top_logprobs: int = 5,
        samples: int = 5,
        price_in: float | None = None,
        price_out: float | None = None,
        max_side: int = 768,
        image_format: str = "auto",
        jpeg_quality: int = 90,
        detail: str | None = None,
        seed: int | None = None,
        system: str | None = None,
        send_options: bool = False,
        cache: ResponseCache | None = None,
        name: str | None = None,
    ) -> None:
        if not model:
            raise SpecError("openai backend needs a model name: openai:<model>@<base_url>")
        if image_format not in ("auto", "jpeg", "png"):
            raise SpecError(f"image_format must be auto, jpeg or png, not {image_format!r}")
        if token_param not in ("auto", "max_tokens", "max_completion_tokens"):
            raise SpecError(
                f"token_param must be auto, max_tokens or max_completion_tokens, not {token_param!r}"
            )
        if not base_url.startswith(("http://", "https://")):
            raise SpecError(f"base URL {base_url!r} needs a scheme: http://host:port/v1 or https://...")
        reasoning = is_reasoning_model(model)
        self._ahead = ReadAhead()
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.name = name or (
            f"openai:{model}" if self.base_url == DEFAULT_BASE_URL else f"openai:{model}@{self.base_url}"
        )
        # reasoning models think before the first byte: minutes, not seconds
        self.timeout = timeout if timeout is not None else (300.0 if reasoning else 60.0)
        self.concurrency = max(1, concurrency)
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        # Reasoning models reject a non-default temperature and spend tokens thinking before answering.
        self.temperature = None if reasoning and temperature == DEFAULT_TEMPERATURE else temperature
        self.max_tokens = max_tokens if max_tokens is not None else (4096 if reasoning else 128)
        self.use_n = use_n
        # one request with all its retries; None: three attempts' time and 30 s of waits, 0: none
        self.deadline = (3 * self.timeout + 30 if deadline is None else deadline) or None
        self.reasoning_effort = reasoning_effort
        self.run_seed = run_seed
        self.logprobs = logprobs and not reasoning  # reasoning models return no logprobs
        self.top_logprobs = min(max(top_logprobs, 0), 20)  # the API's limit
        self.samples = max(1, samples)
        listed = known_price(model)
        default_in, default_out = listed or (0.0, 0.0)
        self.price_in = default_in if price_in is None else price_in
        self.price_out = default_out if price_out is None else price_out
        self.paid = is_paid_endpoint(self.base_url)
        # False only where a bill is sure but its size unknown: a cost cap could not hold.
        self.price_known = (
            not self.paid or listed is not None or (price_in is not None and price_out is not None)
        )
        if not self.price_known:
            log.warning(
                "%s: no price known for %r; its cost is counted as 0 USD (pass price_in= and price_out=, "
                "USD per 1M tokens)",
                self.name,
                model,
            )
        self.max_side = max_side
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.detail = detail
        self.seed = seed
        self.system = system
        self.send_options = send_options
        self.cache = cache
        self.usage = Usage()
        self.cache_hits = 0
        self._api_key = api_key or None  # only ever sent as a header; kept out of repr and cache keys
        self.key_env = key_env  # the environment variable the key came from (named after a 401)
        self._lock = threading.Lock()
        self._images: OrderedDict[str, str] = OrderedDict()
        self._server_n: bool | None = None  # learnt: does the server honour ``n``?
        self._server_logprobs: bool | None = None  # learnt: does it return logprobs?
        if token_param == "auto":
            token_param = "max_completion_tokens" if reasoning else "max_tokens"
        self._token_param = token_param  # learnt from a 400 unsupported_parameter too
        self._send_temperature = self.temperature is not None
        self._client: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self._rng = random.Random()  # jitter only: spreads retries of concurrent requests apart
        self._loop = _LoopThread(f"icdistill-{model}")
        self._finalizer = weakref.finalize(self, self._loop.stop)

    def __repr__(self) -> str:
        return f"OpenAIChatModel(model={self.model!r}, base_url={self.base_url!r}, auth={'yes' if self._api_key else 'no'})"

    # -- public sync API

    def sample(self, query: Query, n: int) -> TeacherResponse:
        """``n`` zero-shot answers (mapped onto ``query.options`` when possible); raises TeacherError."""
        return self._loop.run(self._asample(query, self.build_messages(query, []), n))

    def sample_many(self, queries: Sequence[Query], n: int) -> list[TeacherResponse | TeacherError]:
        """``sample`` for many queries at once (bounded by ``concurrency``); failures are returned, not raised."""

        async def run_all() -> list[TeacherResponse | TeacherError]:
            # Messages (base64 images) are built just in time, so a long list never sits in memory at once.
            window = asyncio.Semaphore(2 * self.concurrency)

            async def one(q: Query) -> TeacherResponse | TeacherError:
                async with window:
                    try:
                        return await self._asample(q, self.build_messages(q, []), n)
                    except TeacherError as e:
                        return e

            return list(await asyncio.gather(*(one(q) for q in queries)))

        return self._loop.run(run_all())

    async def asample(self, query: Query, n: int) -> TeacherResponse:
        """``sample`` for callers that are themselves async (any event loop)."""
        return await self._loop.submit(self._asample(query, self.build_messages(query, []), n))

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        """Greedy answer with token logprobs when the server gives them, else scores from sampled votes."""
        ahead = self._ahead.take(query, demos)
        if ahead is not None:
            return ahead
        t0 = time.perf_counter()
        pred = self._loop.run(self._apredict(query, self.build_messages(query, demos)))
        pred.seconds = time.perf_counter() - t0
        return pred

    def predict_batch(
        self, queries: Sequence[Query], demos_lists: Sequence[Sequence[Demo]]
    ) -> list[Prediction]:
        """``predict`` for a micro-batch (``--batch``): the requests go out together on the client's
        event loop (at most ``concurrency`` open at once). Each prediction's ``seconds`` is its share of
        the batch's time. Raises the first failure, as ``predict`` would."""
        t0 = time.perf_counter()

        async def run_all() -> list[Prediction]:
            calls = [
                self._apredict(q, self.build_messages(q, d))
                for q, d in zip(queries, demos_lists, strict=True)
            ]
            return list(await asyncio.gather(*calls))

        preds = self._loop.run(run_all())
        share = (time.perf_counter() - t0) / max(1, len(preds))
        for p in preds:
            p.seconds = share
        return preds

    def prefetch(self, queries: Sequence[Query], demos_lists: Sequence[Sequence[Demo]]) -> None:
        """Send a micro-batch's requests together (at most ``concurrency`` open at once); ``predict``
        with the same query and demos then takes its prediction (``icdistill.models.readahead``). A
        request that failed is kept out: its query asks again, and raises, when it is answered."""
        t0 = time.perf_counter()

        async def run_all() -> list[Prediction | BaseException]:
            calls = [
                self._apredict(q, self.build_messages(q, d))
                for q, d in zip(queries, demos_lists, strict=True)
            ]
            return list(await asyncio.gather(*calls, return_exceptions=True))

        got = self._loop.run(run_all())
        share = (time.perf_counter() - t0) / max(1, len(got))
        kept = [
            (q, d, p) for q, d, p in zip(queries, demos_lists, got, strict=True) if isinstance(p, Prediction)
        ]
        for _, _, p in kept:
            p.seconds = share
        self._ahead.keep([k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept])

    def check_reachable(self) -> None:
        """Cheap requests before a run (no tokens): fail in a second, not after a stream of retried
        calls, when the server is down, the URL wrong or the key refused. ``GET /models`` first; a
        server without it (404) is asked ``POST /chat/completions`` with an empty body, the endpoint
        the run uses: a 400 says it is there, a 404 that the URL is wrong (e.g. without ``/v1``)."""
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        resp = self._probe("GET", "models", headers)
        self._refuse_key(resp)
        if resp.is_success:
            return
        chat = self._probe("POST", "chat/completions", headers)
        self._refuse_key(chat)
        if chat.status_code in (404, 405):
            hint = (
                ""
                if self.base_url.endswith("/v1")
                else f"; OpenAI-compatible servers serve it under /v1: try {self.base_url}/v1"
            )
            raise TeacherRefused(
                f"{self.name}: HTTP {chat.status_code} for POST {self.base_url}/chat/completions: no chat "
                f"API at this URL{hint}"
            )

    def _probe(self, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
        timeout = min(self.timeout, 10.0)
        try:
            body = {} if method == "POST" else None  # no model, no messages: refused, nothing generated
            return httpx.request(
                method, f"{self.base_url}/{path}", headers=headers, json=body, timeout=timeout
            )
        except httpx.TimeoutException:
            raise TeacherError(
                f"{self.name}: {self.base_url} did not answer within {timeout:g}s; is the server up?"
            ) from None
        except httpx.HTTPError as e:
            raise TeacherError(
                f"{self.name}: cannot reach {self.base_url} ({type(e).__name__}: {e}); start the server "
                "or fix the URL"
            ) from None

    def _refuse_key(self, resp: httpx.Response) -> None:
        if resp.status_code in (401, 403):
            raise TeacherRefused(
                f"{self.name}: HTTP {resp.status_code}: {error_info(resp).message}{key_hint(self.key_env)}"
            )

    def close(self) -> None:
        """Close the HTTP connections and the private event loop (the object can be used again)."""
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(RuntimeError):  # called from the loop itself: nothing to close with
                self._loop.run(client.aclose())
        self._sem = None
        self._loop.stop()

    def __enter__(self) -> OpenAIChatModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- async core (runs on the private loop)

    def _account(self, usage: Usage) -> None:
        with self._lock:
            self.usage.add(usage)

    async def _asample(self, query: Query, messages: list[dict[str, Any]], n: int) -> TeacherResponse:
        usage = Usage()
        try:
            params = self._params(query, self.temperature)
            choices = await self._complete(messages, params, n, usage)
            failed = self._count_failed(choices, usage)
            if len(failed) == len(choices):
                raise TeacherError(f"{self.name}: no usable answer among {n}: {failed[0]}")
        except TeacherError as e:
            e.usage = usage  # type: ignore[attr-defined]  # what the failed call cost, for the run's accounting
            raise
        finally:
            self._account(usage)
        # A failed sample stays in place as an empty answer: it votes for nothing, so it lowers the
        # agreement instead of vanishing, and an empty answer is never pooled.
        answers = ["" if c.get("failed") else c["content"].strip() for c in choices]
        if query.options:
            answers = [(closest_option(a, query.options) or a) if a else a for a in answers]
        return TeacherResponse(answers=answers, usage=usage)

    async def _apredict(self, query: Query, messages: list[dict[str, Any]]) -> Prediction:
        usage = Usage()
        try:
            return await self._predict_core(query, messages, usage)
        finally:
            self._account(usage)

    async def _predict_core(self, query: Query, messages: list[dict[str, Any]], usage: Usage) -> Prediction:
        greedy: str | None = None
        if self.logprobs and self._server_logprobs is not False:
            params = self._params(query, 0.0) | {"logprobs": True, "top_logprobs": self.top_logprobs}
            try:
                (choice,) = await self._complete(messages, params, 1, usage)
            except _LogprobsRejected:
                self._server_logprobs = False
                log.info("%s: server rejects logprobs; scoring by sampled votes", self.name)
            else:
                if not self._count_failed([choice], usage):
                    greedy = choice["content"].strip()
                    entries = choice["logprobs"]
                    if entries:
                        self._server_logprobs = True
                        pred = self._from_logprobs(query, greedy, entries)
                        if pred is not None:
                            return pred
                    elif entries is None and self._server_logprobs is None:
                        self._server_logprobs = False  # silently ignored: don't ask again
        # Fallback: uncertainty from the disagreement of sampled answers.
        choices = await self._complete(messages, self._params(query, self.temperature), self.samples, usage)
        failed = self._count_failed(choices, usage)
        answers = [c["content"].strip() for c in choices if not c.get("failed")]
        answers += [greedy] if greedy is not None else []
        if not answers:
            raise TeacherError(f"{self.name}: no usable answer among {len(choices)}: {failed[0]}")
        if query.options:
            scores = vote_scores(answers, query.options)
            prefer = closest_option(greedy, query.options) if greedy is not None else None
            return Prediction(answer=_best(scores, prefer), option_scores=scores)
        counts = Counter(normalise(a) for a in answers)
        total = sum(counts.values())
        h = -sum(c / total * math.log(c / total) for c in counts.values())
        if greedy is None:
            top = counts.most_common(1)[0][0]
            greedy = next(a for a in answers if normalise(a) == top)
        return Prediction(answer=greedy, token_entropies=[float(h)])


def from_spec(spec: Spec, role: str, ctx: ModelContext) -> OpenAIChatModel:
    """``openai:<model>[@<base_url>][?api_key_env=..&timeout=..&concurrency=..&retries=..&cache=0|1&...]``.

    ``temperature=none`` sends no temperature, ``n=0`` one request per sample, ``deadline=S`` bounds a
    request with all its retries (default 3 x timeout + 30 s; 0: none), ``token_param=max_completion_tokens``
    for servers that want it.
    """
    model, _, base_url = spec.target.partition("@")
    model = model.strip()
    base_url = base_url.strip() or DEFAULT_BASE_URL
    if not model:
        raise SpecError(f"spec {spec.raw!r}: expected openai:<model>@<base_url>")
    known = {
        "api_key_env", "timeout", "concurrency", "retries", "backoff", "max_backoff", "temperature",
        "max_tokens", "logprobs", "top_logprobs", "samples", "price_in", "price_out", "max_side",
        "image_format", "jpeg_quality", "detail", "seed", "system", "send_options", "cache", "cache_dir",
        "token_param", "n", "deadline", "reasoning_effort",
    }  # fmt: skip
    unknown = sorted(set(spec.options) - known)
    if unknown:
        raise SpecError(
            f"spec {spec.raw!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )

    def flag(key: str, default: bool) -> bool:
        return spec.opt(key, default, lambda v: v.strip().lower() not in ("0", "false", "no", "off"))

    key_env = spec.opt("api_key_env", "OPENAI_API_KEY")
    api_key = os.environ.get(key_env) or None
    if api_key is None and is_paid_endpoint(base_url):
        # Fail before a run starts instead of retrying every teacher call into a 401.
        raise SpecError(
            f"spec {spec.raw!r}: {base_url} needs an API key; set the {key_env} environment variable "
            f"(or name another with api_key_env=)"
        )

    def optional_float(v: str) -> float | None:
        return None if v.strip().lower() in ("", "none", "default") else float(v)

    cache: ResponseCache | None = None
    if flag("cache", True):
        root = spec.opt("cache_dir", None)
        path = (Path(root).expanduser() if root else default_cache_dir()) / CACHE_FILE
        cache = ctx.get_or_create(f"openai-response-cache:{path}", lambda: ResponseCache(path))
    seed = spec.opt("seed", None, int)
    return OpenAIChatModel(
        model,
        base_url,
        api_key=api_key,
        key_env=key_env,
        timeout=spec.opt("timeout", None, float),
        concurrency=spec.opt("concurrency", 4, int),
        retries=spec.opt("retries", 4, int),
        backoff=spec.opt("backoff", 1.0, float),
        max_backoff=spec.opt("max_backoff", 60.0, float),
        temperature=spec.opt("temperature", DEFAULT_TEMPERATURE, optional_float),
        max_tokens=spec.opt("max_tokens", None, int),
        token_param=spec.opt("token_param", "auto"),
        use_n=flag("n", True),
        deadline=spec.opt("deadline", None, optional_float),
        reasoning_effort=spec.opt("reasoning_effort", None),
        run_seed=ctx.seed,
        logprobs=flag("logprobs", True),
        top_logprobs=spec.opt("top_logprobs", 5, int),
        samples=spec.opt("samples", 5, int),
        price_in=spec.opt("price_in", None, float),
        price_out=spec.opt("price_out", None, float),
        max_side=spec.opt("max_side", 768, int),
        image_format=spec.opt("image_format", "auto"),
        jpeg_quality=spec.opt("jpeg_quality", 90, int),
        detail=spec.opt("detail", None),
        seed=seed,
        system=spec.opt("system", None),
        send_options=flag("send_options", False),
        cache=cache,
    )
