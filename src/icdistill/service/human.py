"""A person as teacher: the labelling queue (leases, skips) and the annotation a submitted label becomes.

Queued items live in the store (state ``pending_human``), so the queue survives restarts. A labeller
leases one item at a time; others never get an item while its lease runs.
"""

from __future__ import annotations

import threading
from typing import Any

from icdistill.errors import TeacherError
from icdistill.service.store import Store
from icdistill.service.validate import checked_label
from icdistill.types import Annotation, Query, TeacherResponse, Usage


class HumanTeacher:
    """Stands in the Distiller's teacher seat when a person answers: it is never called, labels arrive
    through the queue."""

    name = "human"

    def sample(self, query: Query, n: int) -> TeacherResponse:
        raise TeacherError("a person answers this query on the /label page")


def human_annotation(label: str, options: list[str] | None, labeller: str) -> Annotation:
    """A person's label, checked as every demo's is: one of the options (case aside), never the
    nearest one ("not a Bag" is not "Bag")."""
    label = checked_label(label, options)
    return Annotation(
        answer=label,
        samples=[label],
        votes={label: 1},
        agreement=1.0,
        accepted=True,
        teacher=f"human:{labeller}" if labeller else "human",
        usage=Usage(calls=1),
    )


class LabelQueue:
    """Per-labeller skips on top of the store's leases. Called from the loop thread only."""

    def __init__(self, store: Store, lease_s: float) -> None:
        self.store = store
        self.lease_s = lease_s
        self._skips: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def next_item(self, labeller: str) -> dict[str, Any] | None:
        with self._lock:
            skips = self._skips.get(labeller, [])
        item = self.store.claim_next(labeller, self.lease_s, skips)
        if item is None and skips:
            # everything left was skipped by this labeller: start over rather than show nothing
            with self._lock:
                self._skips.pop(labeller, None)
            item = self.store.claim_next(labeller, self.lease_s)
        return item

    def skip(self, query_id: str, labeller: str) -> None:
        with self._lock:
            self._skips.setdefault(labeller, []).append(query_id)
            del self._skips[labeller][:-500]
        self.store.release(query_id, labeller)
