"""Where requests' CPU work runs (multipart and JSON parsing, base64, image decoding, imports): two
threads, never the event loop. Two, not one per request: each holds the GIL while it runs Python, and
the event loop waits its turn behind every thread that does, so 32 requests decoding at once held
``/healthz`` for hundreds of milliseconds; more than two buys no throughput on the model's single
loop thread."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")
WORKERS = 2
BACKGROUND_NICE = 5  # how much less CPU priority the worker threads get than the event loop's thread


def lower_priority(step: int = BACKGROUND_NICE) -> None:
    """Lower the calling thread's CPU priority (Linux: threads have nice values of their own), so on a
    busy machine the event loop's thread is scheduled first and cheap requests stay cheap. Threads
    this one starts later (torch's) inherit it."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except (AttributeError, OSError):
        pass


_POOL = ThreadPoolExecutor(WORKERS, thread_name_prefix="icd-cpu", initializer=lower_priority)


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_POOL, partial(fn, *args))
