"""The teacher as workers sharing a ``PostgresPool`` call it: ``ClaimingAnnotator`` claims an item before
buying its label, keeps its claims alive while the call runs, and returns a label another worker
bought as a ``ReusedAnnotation`` (a pool hit, no teacher call)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from icdistill.errors import NotCalled
from icdistill.pool.pg import PostgresPool
from icdistill.pool.pg_connection import _first_line
from icdistill.types import Annotation, Demo, Query, Usage

log = logging.getLogger(__name__)


class ClaimingAnnotator:
    """Wraps an annotator (``TestTimeScaling``) so that workers sharing a ``PostgresPool`` buy each
    image+prompt once, within one global budget.

    ``annotate`` claims the item first. Claimed: the teacher is called (a failure releases the claim).
    Already pooled, or bought by another worker meanwhile (waits up to the claim lease, by LISTEN: the
    claim's deletion wakes it, and ``recheck_s`` bounds a wait whose wake-up was lost or whose claimant
    died): that demo's answer is returned at no cost, marked as reused (a pool hit: nothing stored, no
    call counted). Ledger cap reached: ``NotCalled`` (a ``TeacherError`` the Distiller counts as no call).
    """

    def __init__(self, inner: Any, pool: PostgresPool, recheck_s: float = 5.0) -> None:
        self.inner = inner
        self.pool = pool
        self.recheck_s = recheck_s

    def annotate(self, query: Query) -> Annotation:
        deadline = time.monotonic() + self.pool.lease_s + 1.0
        while True:
            state = self.pool.claim(query)
            if state == "claimed":
                try:
                    with _renewing(self.pool):
                        return self.inner.annotate(query)
                except BaseException:
                    self.pool.release(query)
                    raise
            if state == "budget":
                raise NotCalled("the shared pool's teacher budget is spent (ledger cap reached)")
            wait = self.recheck_s
            if state == "pooled":
                twin = self.pool.demo_like(query)
                if twin is not None:
                    return reused_annotation(twin)
                wait = 0.05  # pooled a moment ago and gone again (evicted): look once more soon
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotCalled("another worker holds the claim on this image and prompt; gave up waiting")
            self.pool.wait_for_claim(query, min(wait, left))

@contextlib.contextmanager
def _renewing(pool: PostgresPool) -> Iterator[None]:
    """Renew the pool's claims every third of a lease while the block runs: a teacher call slower
    than the lease (test-time scaling, retries) must not let another worker buy the same label."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(pool.lease_s / 3):
            try:
                pool.renew_claims()
            except Exception as e:  # the database is briefly away: the next beat tries again
                log.warning("could not renew the pool's claims: %s", _first_line(e))

    t = threading.Thread(target=beat, name="icd-claim-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()

@dataclass
class ReusedAnnotation(Annotation):
    """A label another worker bought (``reused_demo`` is its demo): no teacher call, no cost, and
    nothing new for the pool. The Distiller counts it as a pool hit, not as a teacher call."""

    reused_demo: int | None = None

def reused_annotation(demo: Demo) -> ReusedAnnotation:
    votes = demo.provenance.get("votes") or {demo.answer: 1}
    return ReusedAnnotation(
        answer=demo.answer,
        samples=[demo.answer],
        votes=votes,
        agreement=float(demo.provenance.get("agreement") or 1.0),
        accepted=True,
        teacher=f"{demo.provenance.get('teacher') or ''} (demo {demo.id}, bought by another worker)",
        usage=Usage(),
        reused_demo=demo.id,
    )
