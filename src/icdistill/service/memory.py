"""Memory that returns when the load goes: glibc's malloc keeps freed memory unless told otherwise.

* ``tune_malloc``: large buffers (decoded images, request bodies) always come from ``mmap`` and go
  back to the system when freed (glibc otherwise raises its mmap threshold after the first big free,
  and later big buffers fragment the heap); a few arenas, not 8 per core for the threads that decode.
* ``trim``: give the heap's free pages back (``malloc_trim``), run when the service goes idle.

Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _libc()


def tune_malloc(mmap_threshold: int = 1 << 20, arenas: int = 4) -> bool:
    if _LIBC is None:
        return False
    ok = bool(_LIBC.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(_LIBC.mallopt(M_ARENA_MAX, arenas))
    if not ok:
        log.info("could not tune malloc (mallopt refused)")
    return ok


def trim() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
