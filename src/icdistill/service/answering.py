"""Answering a request now: the student answers with the pool's demos, the gate decides whether the
teacher is asked, and a request that asked to wait waits for the teacher's label."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, TypeVar

from PIL import Image

from icdistill.service.store import (
    ANSWERED,
    PENDING_HUMAN,
    PENDING_TEACHER,
)
from icdistill.service.validate import check_prompt_cost
from icdistill.types import (
    Query,
    image_to_png,
)

T = TypeVar("T")


class _Answering:
    """How ``Engine`` answers a request now: the student's answer (with demos), the gate's decision,
    and the wait for the teacher when asked (a mixin over the engine's state)."""

    # ------------------------------------------------------------------ answer now
    async def predict(
        self,
        image: Image.Image,
        prompt: str,
        options: list[str] | None,
        label: str | None = None,
        wait: bool = False,
    ) -> dict[str, Any]:
        await self.start()
        t0 = time.perf_counter()
        row = await self.thread.call(self._answer_now, image, prompt, options, label)
        qid = row["query_id"]
        fut: asyncio.Future[dict[str, Any]] | None = None
        if wait and row["state"] in (PENDING_TEACHER, PENDING_HUMAN):
            fut = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(qid, []).append(fut)
        if row["state"] == PENDING_TEACHER:
            self._spawn(qid)
        if fut is not None:
            # a person may have labelled it before the waiter was registered
            now = await self.thread.call(self.store.get, qid)
            if now is not None and now["state"] not in (PENDING_TEACHER, PENDING_HUMAN) and not fut.done():
                fut.set_result(self._public(now, None))
            try:
                row = await asyncio.wait_for(asyncio.shield(fut), self.cfg.wait_timeout_s)
            except TimeoutError:
                row = {**row, "wait_timed_out": True}
            finally:
                waiters = self._waiters.get(qid, [])
                if fut in waiters:
                    waiters.remove(fut)
                if not waiters:
                    self._waiters.pop(qid, None)
        dt = time.perf_counter() - t0
        with self._stats_lock:
            self.latencies.append(dt)
        if self.on_event is not None:
            self.on_event("predict", dt)
        return row

    def _answer_now(
        self, image: Image.Image, prompt: str, options: list[str] | None, label: str | None
    ) -> dict[str, Any]:
        check_prompt_cost(prompt, self._prompt_tokens, self.cfg.max_prompt_tokens)
        qid = uuid.uuid4().hex
        position, calls = self.store.take_slot()
        if calls is not None:  # other servers spend too: the gate paces the whole stream's calls
            self.distiller.teacher_calls = calls
        q = Query(
            id=qid,
            image=image,
            prompt=prompt,
            options=tuple(options) if options else None,
            label=label,
            position=position,
        )
        draft = self.distiller.answer_now(q)
        state = ANSWERED
        if draft.asked:
            state = PENDING_HUMAN if self.cfg.human_teacher else PENDING_TEACHER
        row = {
            "query_id": qid,
            "position": q.position,
            "prompt": prompt,
            "options": options,
            "image_png": image_to_png(image) if draft.asked else None,
            "label": label,
            "state": state,
            "answer": draft.first.answer,
            "uncertainty": draft.uncertainty,
            "teacher_asked": draft.asked,
            "gate_reason": draft.reason,
            "ctx_teacher_calls": draft.ctx.teacher_calls,
            "ctx_pool_size": draft.ctx.pool_size,
            "ctx_kind": getattr(draft.ctx, "kind", ""),
            "demo_ids": [d.id for d in draft.demos],
        }
        self.store.add_query(row, self.teacher_name)
        if draft.asked:
            self._drafts[qid] = draft
        with self._stats_lock:
            self._counts[state] += 1
            self.events["queries"] += 1
            if draft.asked:
                self._ledger["teacher_calls"] += 1
                self._ledger["reserved"] += 1
        return self._public(self.store.get(qid), draft.first)
