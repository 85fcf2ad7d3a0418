"""A person labels (``--teacher human``): the next item for a labeller, a skip, a submitted label."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from icdistill.service.errors import conflict, not_found
from icdistill.service.human import human_annotation
from icdistill.service.images import png_b64
from icdistill.service.store import (
    PENDING_HUMAN,
)
from icdistill.types import (
    png_to_image,
)

T = TypeVar("T")


class _Labelling:
    """How ``Engine`` takes labels from people: the next item, a skip, a submitted label (a mixin
    over the engine's state)."""

    # ------------------------------------------------------------------ a person labels
    async def next_label_item(self, labeller: str) -> dict[str, Any] | None:
        # a person waits on these: ahead of the queued predictions (see ``LoopThread``)
        item = await self.thread.call_first(self.labels.next_item, labeller)
        if item is None:
            return None
        item["image_b64"] = png_b64(png_to_image(item["image_png"])) if item["image_png"] else None
        item["options_list"] = json.loads(item["options"]) if item["options"] else None
        return item

    async def skip_label(self, qid: str, labeller: str) -> None:
        await self.thread.call_first(self.labels.skip, qid, labeller)

    async def submit_label(self, qid: str, label: str, labeller: str) -> dict[str, Any]:
        if not self.cfg.human_teacher:
            raise conflict("this service's teacher is a model, not a person")
        row = await self.thread.call_first(self._label, qid, label, labeller)
        self._wake(qid, row)
        return row

    def _label(self, qid: str, label: str, labeller: str) -> dict[str, Any]:
        row = self.store.get(qid)
        if row is None:
            raise not_found(f"no query {qid}")
        if row["state"] != PENDING_HUMAN:
            raise conflict(f"query {qid} is not waiting for a label (state: {row['state']})")
        options = json.loads(row["options"]) if row["options"] else None
        return self._finish(qid, human_annotation(label, options, labeller), None)
