"""The service's loop thread: one worker thread that owns the loop state (the Distiller, the pool, the
store), and runs what it is given in order, but for one thing: work a person waits on (the /label page,
a label submitted, a logout) goes before the model passes already queued, so a page never waits for
a queue of predictions (it waits at most for the pass running now)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
FIRST = 0  # a person waits on it
NORMAL = 1  # model passes, imports, the teacher queue's bookkeeping


class LoopThread:
    """``await call(fn)`` runs ``fn`` on the loop thread; ``await call_first(fn)`` runs it before the
    work already queued."""

    def __init__(self) -> None:
        self._q: queue.PriorityQueue[tuple[int, int, Future[Any] | None, Callable[[], Any] | None]] = (
            queue.PriorityQueue()
        )
        self._seq = itertools.count()
        self._closed = False
        self._lock = threading.Lock()
        self.queued = 0  # waiting or running (read without the lock: a gauge)
        self._thread = threading.Thread(target=self._run, name="icd-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from icdistill.service.cpu import lower_priority

        lower_priority()  # model passes yield the CPU to the event loop (and so do torch's threads)
        while True:
            _, _, fut, fn = self._q.get()
            if fut is None or fn is None:
                return
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed to the caller
                        fut.set_exception(e)
            finally:
                with self._lock:
                    self.queued -= 1

    def submit(self, fn: Callable[..., T], *args: Any, priority: int = NORMAL, **kwargs: Any) -> Future[T]:
        fut: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the loop thread is shut down")
            self.queued += 1
            self._q.put((priority, next(self._seq), fut, partial(fn, *args, **kwargs)))
        return fut

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    async def call_first(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args, priority=FIRST))

    def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return self.submit(fn, *args).result()

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` there without waiting for it (a clean-up that must not be cancelled)."""
        with contextlib.suppress(RuntimeError):  # shut down already
            self.submit(fn, *args).add_done_callback(_log_failure)

    def close(self) -> None:
        """Cancels what is queued, lets the running call finish, then stops."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while True:
                try:
                    _, _, fut, _ = self._q.get_nowait()
                except queue.Empty:
                    break
                if fut is not None:
                    fut.cancel()
                    self.queued -= 1
            self._q.put((-1, next(self._seq), None, None))
        if threading.current_thread() is not self._thread:
            self._thread.join()


def _log_failure(fut: Future[Any]) -> None:
    """Nobody waits for a posted clean-up: its failure is logged, not dropped with the future."""
    if not fut.cancelled() and fut.exception() is not None:
        log.error("a clean-up on the loop thread failed", exc_info=fut.exception())
