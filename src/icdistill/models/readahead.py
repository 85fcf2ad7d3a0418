"""Predictions read ahead in a micro-batch (``--batch``), kept until the loop asks for them.

The loop answers a micro-batch's queries one at a time, as with ``--batch 1``, after their student
passes were read together (``Student.prefetch``). A stateless student (``hf:``, ``openai:``) keeps the
batch's predictions here, keyed by the query and the exact demos shown; ``predict`` with the same
query and demos takes its prediction (once), anything else is read afresh (a query whose demos
changed after a teacher call earlier in the batch).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from icdistill.types import Demo, Prediction, Query

# predictions kept at most (a batch's worth is taken right after it is read)
READ_AHEAD_SIZE = 1024


def _key(query: Query, demos: Sequence[Demo]) -> tuple[object, ...]:
    shown = tuple((d.id, d.query_id, d.answer) for d in demos)
    return (query.id, query.position, query.prompt, tuple(query.options or ()), shown)


class ReadAhead:
    """A bounded, thread-safe store of the last micro-batch's predictions (see the module doc)."""

    def __init__(self, size: int = READ_AHEAD_SIZE) -> None:
        self.size = size
        # per key, its predictions in the order read (the same query twice in a batch: two)
        self._kept: OrderedDict[tuple[object, ...], list[Prediction]] = OrderedDict()
        self._lock = threading.Lock()

    def keep(
        self, queries: Sequence[Query], demos_lists: Sequence[Sequence[Demo]], preds: Sequence[Prediction]
    ) -> None:
        with self._lock:
            self._kept.clear()  # a batch's predictions are taken before the next batch is read
            for q, demos, p in zip(queries, demos_lists, preds, strict=True):
                self._kept.setdefault(_key(q, demos), []).append(p)
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)

    def take(self, query: Query, demos: Sequence[Demo]) -> Prediction | None:
        key = _key(query, demos)
        with self._lock:
            kept = self._kept.get(key)
            if not kept:
                return None
            pred = kept.pop(0)
            if not kept:
                del self._kept[key]
            return pred

    def __len__(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._kept.values())
