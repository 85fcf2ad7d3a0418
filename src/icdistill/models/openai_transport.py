"""The transport of the ``openai:`` backend: async HTTP on a private event loop, retries with
exponential backoff and jitter (honouring Retry-After), the response cache consulted per sample, and
``n`` samples in one request where the server allows it."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from icdistill.errors import TeacherError, TeacherRefused
from icdistill.models.openai_parse import (
    _parse_choice,
    error_info,
)
from icdistill.models.openai_quirks import (
    _LogprobsRejected,
    _NRejected,
    _refuses_n,
    _Unsupported,
    _unsupported_param,
)
from icdistill.models.response_cache import cache_key
from icdistill.types import Usage

log = logging.getLogger(__name__)
T = TypeVar("T")


def key_hint(key_env: str | None) -> str:
    """What to check after a 401 or 403: the environment variable the key was read from."""
    if key_env:
        return f" (check the key in the {key_env} environment variable)"
    return " (check the API key)"


class _Retryable(Exception):
    """A failed attempt worth retrying; ``retry_after`` is the server's requested delay in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


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


class _Transport:
    """How ``OpenAIChatModel`` gets its choices: from the response cache, else over HTTP with
    retries, backoff and ``n`` (a mixin over the model's state)."""

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
        if code in (401, 403, 404):
            hint = key_hint(self.key_env) if code in (401, 403) else ""
            raise TeacherRefused(f"{self.name}: HTTP {code}: {text}{hint}")
        raise TeacherError(f"{self.name}: HTTP {code}: {text}")
