"""``openai:<model>@<base_url>``: a teacher and student over any OpenAI-compatible Chat Completions API.

Works with OpenAI (GPT-4o), vLLM, Ollama, llama.cpp and ``icd serve-model``; async, retried, cached.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import threading
import time
import unicodedata
import weakref
from collections import Counter, OrderedDict
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import httpx
from PIL import Image
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from icdistill.errors import SpecError, TeacherError
from icdistill.models.registry import ModelContext, Spec
from icdistill.models.response_cache import CACHE_FILE, ResponseCache, cache_key, default_cache_dir
from icdistill.types import Demo, Prediction, Query, TeacherResponse, Usage, image_digest

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TEMPERATURE = 0.7
_KEY_HINT = " (check the key in the api_key_env variable)"
OPTIONS_PREFIX = "Answer with one of:"
ANSWER_ONLY = "Reply with the answer only."

# USD per 1M (input, output) tokens, list prices of the common models (checked 2026-11); a dated
# snapshot falls back to its family by longest prefix. Unlisted models need price_in/price_out.
PRICES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "gpt-4o": (2.5, 10.0),
        "gpt-4o-2024-05-13": (5.0, 15.0),
        "gpt-4o-mini": (0.15, 0.6),
        "chatgpt-4o-latest": (5.0, 15.0),
        "gpt-4.1": (2.0, 8.0),
        "gpt-4.1-mini": (0.4, 1.6),
        "gpt-4.1-nano": (0.1, 0.4),
        "gpt-4-turbo": (10.0, 30.0),
        "gpt-5": (1.25, 10.0),
        "gpt-5-chat-latest": (1.25, 10.0),
        "gpt-5-mini": (0.25, 2.0),
        "gpt-5-nano": (0.05, 0.4),
        "o1": (15.0, 60.0),
        "o1-mini": (1.1, 4.4),
        "o1-pro": (150.0, 600.0),
        "o3": (2.0, 8.0),
        "o3-mini": (1.1, 4.4),
        "o3-pro": (20.0, 80.0),
        "o4-mini": (1.1, 4.4),
    }
)
# Hosted APIs that bill per token: an unknown model there must not be counted as free.
PAID_HOSTS = ("api.openai.com", ".openai.azure.com", "openrouter.ai", "api.together.xyz", "api.groq.com",
              "api.fireworks.ai", "api.deepseek.com", "api.mistral.ai", "generativelanguage.googleapis.com")  # fmt: skip
# Reasoning models take max_completion_tokens (which also pays the hidden reasoning) and only the
# default temperature.
_REASONING = re.compile(r"^(o\d+|gpt-5)(?!-chat)([-.].*)?$")


def known_price(model: str) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens of a listed model (or a dated snapshot of one), else None."""
    if model in PRICES:
        return PRICES[model]
    family = [k for k in PRICES if model.startswith(k + "-")]
    return PRICES[max(family, key=len)] if family else None


def model_price(model: str) -> tuple[float, float]:
    """(input, output) USD per 1M tokens for a known model, else (0, 0) (local servers are free)."""
    return known_price(model) or (0.0, 0.0)


def is_reasoning_model(model: str) -> bool:
    """OpenAI o-series and gpt-5 models (not gpt-5-chat): no max_tokens, no custom temperature."""
    return bool(_REASONING.match(model.rsplit("/", 1)[-1]))


def is_paid_endpoint(base_url: str) -> bool:
    host = (httpx.URL(base_url).host or "").lower()
    return any(host == h or (h.startswith(".") and host.endswith(h)) for h in PAID_HOSTS)


# --- prompts and answers -------------------------------------------------------------------------


def format_prompt(prompt: str, options: Sequence[str] | None) -> str:
    """The user text of a turn; ``serve_model`` parses the options line back with ``parse_prompt``."""
    if not options:
        return prompt
    return f"{prompt}\n{OPTIONS_PREFIX} {', '.join(options)}.\n{ANSWER_ONLY}"


def parse_prompt(text: str) -> tuple[str, tuple[str, ...] | None]:
    """Inverse of ``format_prompt``: (prompt without the instruction lines, options or None)."""
    kept: list[str] = []
    options: tuple[str, ...] | None = None
    for line in text.split("\n"):
        s = line.strip()
        if options is None and s.startswith(OPTIONS_PREFIX):
            body = s[len(OPTIONS_PREFIX) :].strip().removesuffix(".")
            options = tuple(o.strip() for o in body.split(", ") if o.strip()) or None
        elif s != ANSWER_ONLY:
            kept.append(line)
    return "\n".join(kept).strip(), options


_STRIP = " \t\r\n\"'`.,;:!?()[]{}*_"


def normalise(text: str) -> str:
    """Case-, width- and whitespace-insensitive form used to compare answers with options."""
    s = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"\s+", " ", s).strip(_STRIP)


def closest_option(answer: str, options: Sequence[str]) -> str | None:
    """The option ``answer`` most plausibly names, or None when none (or several) is close enough."""
    from icdistill.teacher import match_option  # one matcher for every backend and the vote

    return match_option(answer, options)


def token_entropy(entry: Mapping[str, Any]) -> float:
    """Entropy (nats) of one generated token over its top alternatives, renormalised."""
    lps = [lp for _, lp in entry.get("top") or []]
    if len(lps) >= 2:
        m = max(lps)
        ps = [math.exp(lp - m) for lp in lps]
        z = sum(ps)
        return float(-sum(p / z * math.log(p / z) for p in ps if p > 0))
    # No alternatives reported: treat "not this token" as one outcome (a lower bound).
    p = min(max(math.exp(entry["logprob"]), 1e-12), 1 - 1e-12)
    return float(-(p * math.log(p) + (1 - p) * math.log(1 - p)))


def first_token_scores(
    entries: Sequence[Mapping[str, Any]], options: Sequence[str]
) -> dict[str, float] | None:
    """Option log-probabilities from the first informative token's top_logprobs.

    None when the generated first token does not name exactly one option (e.g. options sharing a
    first token, or a chatty "The answer is ..."): the caller then scores by sampled votes.
    Options absent from the top list get the unreported mass, capped by the least likely listed
    token, so every score is finite.
    """
    norms = {o: normalise(o) for o in options}

    def targets(token: str) -> list[str]:
        t = normalise(token)
        if not t:
            return []
        exact = [o for o, n in norms.items() if n == t]
        return exact or [o for o, n in norms.items() if n.startswith(t)]

    entry = next((e for e in entries if normalise(e["token"])), None)
    if entry is None or len(targets(entry["token"])) != 1:
        return None
    tops = list(entry.get("top") or [])
    if not any(tok == entry["token"] for tok, _ in tops):
        tops.append((entry["token"], entry["logprob"]))
    mass = dict.fromkeys(options, 0.0)
    for tok, lp in tops:
        ts = targets(tok)
        for o in ts:
            mass[o] += math.exp(lp) / len(ts)
    listed = [math.exp(lp) for _, lp in tops]
    unmatched = [o for o in options if mass[o] <= 0]
    fill = min(max(0.0, 1.0 - sum(listed)) / len(unmatched), min(listed)) if unmatched else 0.0
    return {o: math.log(max(mass[o] if mass[o] > 0 else fill, 1e-12)) for o in options}


def vote_scores(answers: Sequence[str], options: Sequence[str], alpha: float = 0.5) -> dict[str, float]:
    """Log of the add-``alpha`` smoothed vote share of each option (finite even with no votes)."""
    votes = Counter(o for o in (closest_option(a, options) for a in answers) if o is not None)
    total = sum(votes.values()) + alpha * len(options)
    return {o: math.log((votes[o] + alpha) / total) for o in options}


def _best(scores: Mapping[str, float], prefer: str | None) -> str:
    top = max(scores.values())
    return prefer if prefer in scores and scores[prefer] == top else max(scores, key=scores.__getitem__)


# --- images --------------------------------------------------------------------------------------


def encode_image(image: Image.Image, max_side: int = 768, fmt: str = "auto", quality: int = 90) -> str:
    """A base64 data URI of ``image`` shrunk to ``max_side``; JPEG unless it has transparency (or fmt=png)."""
    img = image
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    has_alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
    use_png = fmt == "png" or (fmt == "auto" and has_alpha)
    buf = io.BytesIO()
    if use_png:
        img.save(buf, format="PNG")
        mime = "image/png"
    else:
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def image_key(image: Image.Image) -> str:
    """A key for the data URI of ``image``: pixels plus the palette and transparency that
    ``image_digest`` (pixel indices only) leaves out, so two palettes never share a URI."""
    if image.mode not in ("P", "PA"):
        return image_digest(image)
    extra = hashlib.sha1(bytes(image.getpalette() or []))
    extra.update(repr(image.info.get("transparency")).encode())
    return f"{image_digest(image)}:{extra.hexdigest()}"


# --- transport -----------------------------------------------------------------------------------


class _Retryable(Exception):
    """A failed attempt worth retrying; ``retry_after`` is the server's requested delay in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _LogprobsRejected(Exception):
    """The server refused the logprobs parameters (HTTP 400); the student retries without them."""


class _NRejected(Exception):
    """The server refuses ``n`` > 1 (llama.cpp: "Only one completion choice is allowed")."""


class _Unsupported(Exception):
    """HTTP 400 naming a parameter the model does not take (OpenAI reasoning models)."""

    def __init__(self, param: str, text: str) -> None:
        super().__init__(text)
        self.param = param


def _retry_after(headers: httpx.Headers) -> float | None:
    """The server's requested delay: ``retry-after-ms`` (OpenAI), else ``Retry-After`` seconds or date."""
    try:
        return max(0.0, float(headers["retry-after-ms"]) / 1000)
    except (KeyError, ValueError):
        pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class ErrorInfo:
    """An error reply's fields, from OpenAI's ``{"error": {...}}``, vLLM's older top-level
    ``{"object": "error", "message": ...}``, FastAPI's ``{"detail": ...}`` or a plain-text body."""

    message: str
    code: str = ""
    param: str = ""
    type: str = ""


def error_info(resp: httpx.Response) -> ErrorInfo:
    try:
        data = resp.json()
    except ValueError:
        data = None
    src: Any = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            src = err
        elif isinstance(err, str):
            src = {"message": err, **{k: data.get(k) for k in ("code", "param", "type")}}
        elif "message" in data:
            src = data
        elif "detail" in data:
            src = {
                "message": json.dumps(data["detail"])
                if not isinstance(data["detail"], str)
                else data["detail"]
            }
    if src is None:
        src = {"message": resp.text}

    def text(key: str) -> str:
        value = src.get(key)
        return "" if value is None else " ".join(str(value).split())

    return ErrorInfo(
        message=text("message")[:300] or resp.reason_phrase,
        code=text("code"),
        param=text("param"),
        type=text("type"),
    )


_PARAM_IN_TEXT = re.compile(r"unsupported (?:parameter|value): '(\w+)'", re.IGNORECASE)


def _unsupported_param(info: ErrorInfo) -> str | None:
    """The parameter a 400 says the model does not take, if it says so."""
    if info.code in ("unsupported_parameter", "unsupported_value") and info.param:
        return info.param
    m = _PARAM_IN_TEXT.search(info.message)
    return m.group(1) if m else None


def _refuses_n(info: ErrorInfo) -> bool:
    msg = info.message.lower()
    return "only one completion choice" in msg or info.param == "n"


def _finite(x: Any) -> float:
    v = float(x)
    return v if math.isfinite(v) else -1e4


def _parse_choice(raw: Any) -> dict[str, Any]:
    """The parts of one API choice we use, in a compact JSON-able form (also the cache value).

    ``failed`` is set for a choice that is no answer: a refusal, a content-filter block, an answer cut
    at the token limit, or no content at all. Such choices are counted, never cached or pooled.
    """
    msg = raw["message"]
    content = msg.get("content")
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    entries = None
    lp = raw.get("logprobs")
    if isinstance(lp, dict) and isinstance(lp.get("content"), list):
        entries = [
            {
                "token": str(e["token"]),
                "logprob": _finite(e["logprob"]),
                "top": [[str(t["token"]), _finite(t["logprob"])] for t in e.get("top_logprobs") or []],
            }
            for e in lp["content"]
        ]
    out: dict[str, Any] = {"content": content if isinstance(content, str) else "", "logprobs": entries}
    refusal, finish = msg.get("refusal"), raw.get("finish_reason")
    if isinstance(refusal, str) and refusal.strip():
        out["failed"] = f"refused ({' '.join(refusal.split())[:80]})"
    elif finish == "content_filter":
        out["failed"] = "blocked by the content filter"
    elif finish == "length":
        out["failed"] = "cut off at the token limit (raise max_tokens)"
    elif not isinstance(content, str):
        out["failed"] = "no answer text in the reply"
    return out


class _LoopThread:
    """A private event loop in a daemon thread, so sync callers work with or without their own loop."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("called from inside the client's own event loop")
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop()))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("called from inside the client's own event loop")
        return asyncio.run_coroutine_threadsafe(coro, self.loop()).result()

    def stop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not threading.current_thread():
                thread.join(timeout=5)
            if not loop.is_running():
                loop.close()


# --- the backend ---------------------------------------------------------------------------------


class OpenAIChatModel:
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
        t0 = time.perf_counter()
        pred = self._loop.run(self._apredict(query, self.build_messages(query, demos)))
        pred.seconds = time.perf_counter() - t0
        return pred

    def check_reachable(self) -> None:
        """One cheap request (``GET /models``, no tokens) before a run: fail in a second, not after a
        stream of retried calls, when the server is down, the URL wrong or the key refused. Any other
        answer (a server without ``/models`` answers 404) counts as reachable."""
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        timeout = min(self.timeout, 10.0)
        try:
            resp = httpx.get(f"{self.base_url}/models", headers=headers, timeout=timeout)
        except httpx.TimeoutException:
            raise TeacherError(
                f"{self.name}: {self.base_url} did not answer within {timeout:g}s; is the server up?"
            ) from None
        except httpx.HTTPError as e:
            raise TeacherError(
                f"{self.name}: cannot reach {self.base_url} ({type(e).__name__}: {e}); start the server "
                "or fix the URL"
            ) from None
        if resp.status_code in (401, 403):
            raise TeacherError(f"{self.name}: HTTP {resp.status_code}: {error_info(resp).message}{_KEY_HINT}")

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

    # -- messages

    def _image_uri(self, image: Image.Image) -> str:
        key = image_key(image)
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        uri = encode_image(image, self.max_side, self.image_format, self.jpeg_quality)
        with self._lock:
            self._images[key] = uri
            while len(self._images) > 256:  # demos repeat across queries; bound the memory
                self._images.popitem(last=False)
        return uri

    def _user_turn(self, image: Image.Image | None, text: str) -> dict[str, Any]:
        if image is None:
            return {"role": "user", "content": text}
        url: dict[str, Any] = {"url": self._image_uri(image)}
        if self.detail:
            url["detail"] = self.detail
        return {
            "role": "user",
            "content": [{"type": "image_url", "image_url": url}, {"type": "text", "text": text}],
        }

    def build_messages(self, query: Query, demos: Sequence[Demo]) -> list[dict[str, Any]]:
        """system?, then (user image+prompt, assistant answer) per demo, then the query's user turn."""
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        for d in demos:
            messages.append(self._user_turn(d.image, format_prompt(d.prompt, query.options)))
            messages.append({"role": "assistant", "content": d.answer})
        messages.append(self._user_turn(query.image, format_prompt(query.prompt, query.options)))
        return messages

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

    def _count_failed(self, choices: list[dict[str, Any]], usage: Usage) -> list[str]:
        failed = [str(c["failed"]) for c in choices if c.get("failed")]
        if failed:
            usage.faults += len(failed)
            log.warning("%s: %d of %d answers unusable: %s", self.name, len(failed), len(choices), failed[0])
        return failed

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

    def _from_logprobs(self, query: Query, answer: str, entries: list[dict[str, Any]]) -> Prediction | None:
        logprobs = [e["logprob"] for e in entries]
        entropies = [token_entropy(e) for e in entries]
        if not query.options:
            return Prediction(answer=answer, token_logprobs=logprobs, token_entropies=entropies)
        scores = first_token_scores(entries, query.options)
        named = closest_option(answer, query.options)
        # The first token only matches options by prefix ("b" of "brown" -> blue): its scores count
        # only when the whole answer names the option they favour.
        if scores is None or named is None or max(scores, key=scores.__getitem__) != named:
            return None
        best = _best(scores, named)
        return Prediction(
            answer=best, option_scores=scores, token_logprobs=logprobs, token_entropies=entropies
        )

    def _params(self, query: Query, temperature: float | None) -> dict[str, Any]:
        """What determines the answer (also the cache key); ``_body`` maps it onto this server's names."""
        params: dict[str, Any] = {"max_tokens": self.max_tokens}
        if temperature is not None:
            params["temperature"] = temperature
        if self.seed is not None:
            params["seed"] = self.seed
        if self.reasoning_effort:
            params["reasoning_effort"] = self.reasoning_effort
        if self.send_options and query.options:
            params["options"] = list(query.options)
        return params

    def _key_params(self, params: dict[str, Any]) -> dict[str, Any]:
        # Without a pinned seed, runs with different --seed must draw fresh samples; run seed 0 adds
        # nothing, so caches written before the run seed was part of the key stay valid.
        if self.seed is None and self.run_seed:
            return params | {"run_seed": self.run_seed}
        return params

    def _body(
        self, messages: list[dict[str, Any]], params: dict[str, Any], k: int, index: int
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        for key, value in params.items():
            if key == "max_tokens":
                body[self._token_param] = value
            elif key != "temperature" or self._send_temperature:
                body[key] = value
        if k > 1:
            body["n"] = k
        elif "seed" in params:
            body["seed"] = params["seed"] + index  # repeated single samples must not be identical
        return body

    def _adapt(self, param: str) -> bool:
        """Stop sending what the model refuses (once; later requests know). False: nothing to change."""
        if param == "max_tokens" and self._token_param == "max_tokens":
            self._token_param = "max_completion_tokens"
        elif param == "max_completion_tokens" and self._token_param == "max_completion_tokens":
            self._token_param = "max_tokens"
        elif param == "temperature" and self._send_temperature:
            self._send_temperature = False
            log.warning("%s: the model takes only its default temperature; sampling at that", self.name)
            return True
        else:
            return False
        log.info("%s: the model takes %s", self.name, self._token_param)
        return True

    async def _complete(
        self, messages: list[dict[str, Any]], params: dict[str, Any], n: int, usage: Usage
    ) -> list[dict[str, Any]]:
        """``n`` parsed choices: cached ones by sample index, the rest requested (filled up if short)."""
        key_params = self._key_params(params)
        keys = (
            [cache_key(self.model, self.base_url, messages, key_params, i) for i in range(n)]
            if self.cache is not None
            else []
        )
        got: list[dict[str, Any] | None] = [None] * n
        if self.cache is not None:
            for i, k in enumerate(keys):
                got[i] = self.cache.get(k)
            hits = sum(c is not None for c in got)
            usage.cached += hits
            with self._lock:
                self.cache_hits += hits
        missing = [i for i, c in enumerate(got) if c is None]
        while missing:
            if len(missing) == 1 or self._server_n is False or not self.use_n:
                results = await asyncio.gather(
                    *(self._request(messages, params, 1, usage, i) for i in missing), return_exceptions=True
                )
                for r in results:
                    if isinstance(r, BaseException):
                        raise r
                pairs = [
                    (i, r[0])
                    for i, r in zip(missing, results, strict=True)
                    if not isinstance(r, BaseException)
                ]
            else:
                try:
                    choices = await self._request(messages, params, len(missing), usage, missing[0])
                except _NRejected:
                    log.info("%s: server refuses n > 1; sampling with one request per answer", self.name)
                    self._server_n = False
                    continue
                if len(choices) == 1:
                    if self._server_n is None:
                        log.info("%s: server ignores n; sampling with one request per answer", self.name)
                    self._server_n = False
                elif len(choices) == len(missing):
                    self._server_n = True
                pairs = list(zip(missing, choices, strict=False))
            for i, c in pairs:
                got[i] = c
                if self.cache is not None and not c.get("failed"):
                    self.cache.put(keys[i], c)
            missing = [i for i, c in enumerate(got) if c is None]
        return [c for c in got if c is not None]

    async def _request(
        self, messages: list[dict[str, Any]], params: dict[str, Any], k: int, usage: Usage, index: int
    ) -> list[dict[str, Any]]:
        """One logical request for ``k`` choices, retried within ``deadline``; >= 1 choice or TeacherError."""
        try:
            async with asyncio.timeout(self.deadline):
                while True:
                    body = self._body(messages, params, k, index)
                    try:
                        return await self._retried(body, k, usage)
                    except _Unsupported as e:
                        if not self._adapt(e.param):
                            raise TeacherError(f"{self.name}: HTTP 400: {e}") from None
        except TimeoutError:
            raise TeacherError(
                f"{self.name}: no answer within the deadline of {self.deadline:g}s (spec option deadline=)"
            ) from None

    async def _retried(self, body: dict[str, Any], k: int, usage: Usage) -> list[dict[str, Any]]:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Retryable),
            stop=stop_after_attempt(self.retries + 1),
            wait=self._wait,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(body, k, usage)
        except _Retryable as e:
            raise TeacherError(f"{self.name}: no answer after {self.retries + 1} attempts: {e.reason}") from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        after = getattr(exc, "retry_after", None)
        if after is not None:
            return min(float(after), self.max_backoff)
        delay = self.backoff * 2 ** (state.attempt_number - 1) + self._rng.uniform(0, self.backoff)
        return min(delay, self.max_backoff)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "%s: %s; retry %d/%d in %.2fs",
            self.name,
            getattr(exc, "reason", exc),
            state.attempt_number,
            self.retries,
            wait,
        )

    def _fault(self, usage: Usage, reason: str, retry_after: float | None = None) -> _Retryable:
        usage.faults += 1
        return _Retryable(reason, retry_after)

    async def _attempt(self, body: dict[str, Any], k: int, usage: Usage) -> list[dict[str, Any]]:
        if self._client is None or self._sem is None:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.base_url + "/",
                headers=headers,
                timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
                limits=httpx.Limits(max_connections=self.concurrency),
            )
            self._sem = asyncio.Semaphore(self.concurrency)
        async with self._sem:
            try:
                resp = await self._client.post("chat/completions", json=body)
            except httpx.TimeoutException:
                raise self._fault(usage, f"timed out after {self.timeout:g}s") from None
            except httpx.HTTPError as e:
                raise self._fault(usage, f"connection failed ({type(e).__name__})") from None
        code = resp.status_code
        if 300 <= code < 400:
            # POSTs are not followed (they would turn into GETs); the address is wrong, not the server busy.
            where = resp.headers.get("location", "elsewhere")
            raise TeacherError(
                f"{self.name}: HTTP {code}: the server redirects to {where}; use that address as the base URL"
            )
        if code >= 400:
            self._raise_for_error(resp, body, usage)
        try:
            data = resp.json()
            choices = [_parse_choice(c) for c in data["choices"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise self._fault(usage, "malformed response (not chat-completion JSON)") from None
        usage.calls += 1
        u = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        pt, ct = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
        usage.prompt_tokens += pt
        usage.completion_tokens += ct
        usage.cost_usd += (pt * self.price_in + ct * self.price_out) / 1e6
        if len(choices) != k:
            usage.faults += 1  # counted; what did come back is used and the rest requested again
            if not choices:
                raise _Retryable(f"{k} choices asked, none returned")
            log.info("%s: asked for %d choices, got %d", self.name, k, len(choices))
        return choices[:k]

    def _raise_for_error(self, resp: httpx.Response, body: dict[str, Any], usage: Usage) -> None:
        code = resp.status_code
        info = error_info(resp)
        text = info.message
        if body.get("n", 1) > 1 and code in (400, 500) and _refuses_n(info):
            raise _NRejected(text)  # llama.cpp: 400, or 500 in older versions
        if code == 429 and "insufficient_quota" in (info.code, info.type):
            raise TeacherError(
                f"{self.name}: HTTP 429: the account's quota is used up ({text}); retrying cannot help"
            )
        if code in (408, 409, 429) or code >= 500:
            raise self._fault(usage, f"HTTP {code}: {text}", _retry_after(resp.headers))
        param = _unsupported_param(info) if code in (400, 422) else None
        if (
            "logprobs" in body
            and code in (400, 422)
            and ("logprob" in text.lower() or param in ("logprobs", "top_logprobs"))
        ):
            raise _LogprobsRejected(text)
        if param:
            raise _Unsupported(param, text)
        hint = _KEY_HINT if code in (401, 403) else ""
        raise TeacherError(f"{self.name}: HTTP {code}: {text}{hint}")


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
