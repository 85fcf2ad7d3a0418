"""The teacher queue of the service: each query the gate sends to the teacher is annotated later on the
teacher threads (claimed first on a shared pool), drafted, finished (pooled, charged) and its waiters
woken."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, TypeVar

from icdistill.distiller import Draft
from icdistill.errors import ICDError, NotCalled, TeacherError
from icdistill.pool import PostgresPool, reused_annotation
from icdistill.service.store import (
    ANNOTATED,
    ANSWERED,
    FAILED,
    PENDING_HUMAN,
    PENDING_TEACHER,
    REJECTED,
)
from icdistill.types import (
    Annotation,
    GateContext,
    GateDecision,
    Prediction,
    Query,
    Usage,
    png_to_image,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class _TeacherQueue:
    """How ``Engine`` asks the teacher later: one task per query sent to it, its claim on a shared
    pool, its draft, its result written and its waiters woken (a mixin over the engine's state)."""

    # ------------------------------------------------------------------ annotate later
    def _spawn(self, qid: str) -> None:
        task = asyncio.get_running_loop().create_task(self._annotate(qid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _annotate(self, qid: str) -> None:
        if qid in self._inflight:  # adopted again after a stall of this very server
            return
        self._inflight.add(qid)
        claimed: Query | None = None
        try:
            draft = await self.thread.call(self._draft_for, qid)
            annotation: Annotation | None = None
            error: str | None = None
            refused: str | None = None  # no call: the shared budget is spent (not a teacher failure)
            if draft.stored is None and isinstance(self.pool, PostgresPool):
                try:
                    annotation = await self._claim_label(draft)
                    claimed = draft.query if annotation is None else None
                except NotCalled as e:
                    refused = str(e)
            if annotation is None and error is None and refused is None:
                if draft.stored is None:
                    error = await self.thread.call(self._count_attempt, qid)
                loop = asyncio.get_running_loop()
                try:
                    if error is None:
                        annotation = await loop.run_in_executor(
                            self._teacher_pool, self.distiller.ask_teacher, draft
                        )
                except TeacherError as e:
                    error = str(e)
                except Exception as e:  # a teacher backend bug must not kill the service or lose the query
                    log.exception("teacher failed on query %s", qid)
                    error = f"teacher crashed: {e!r}"
            row = await self.thread.call(self._finish, qid, annotation, error, refused)
            if error is None:
                claimed = None  # the annotation's commit dropped the claim (a late release could drop a newer one)
            self._wake(qid, row)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "annotating query %s failed; it stays pending and resumes after a restart "
                "(with a shared pool: when its lease lapses, here or on another server)",
                qid,
            )
        finally:
            self._inflight.discard(qid)
            if claimed is not None and isinstance(self.pool, PostgresPool):
                # no demo came of it (or its commit already deleted the claim): another server may buy it
                self.thread.post(self.pool.release, claimed)

    def _count_attempt(self, qid: str) -> str | None:
        """On the books before the request is sent. A second attempt re-buys one a crash cut off
        (it may have been answered and billed): it counts against ``--max-calls`` as a call of its
        own, in the gate's count and in ``calls_spent``, and is not made once the cap is reached
        (returns why: the query fails with it)."""
        row = self.store.get(qid)
        again = row is not None and int(row["attempts"] or 0) >= 1
        cap = self.cfg.max_calls
        if again and cap is not None and self.distiller.teacher_calls >= cap:
            return (
                f"its teacher request was cut off by a restart and not sent again: --max-calls {cap} is reached "
                "(the request cut off may have been billed)"
            )
        self.store.count_attempt(qid)
        if again:
            self.distiller.teacher_calls += 1
            with self._stats_lock:
                self._ledger["teacher_calls"] += 1
                self._ledger["rebought"] = self._ledger.get("rebought", 0) + 1
        return None

    async def _claim_label(self, draft: Draft) -> Annotation | None:
        """Claim the label in the shared pool before the teacher is called. None: ours to buy (one call
        charged to the pool's global ledger); or the label another worker bought, reused at no cost.
        Raises ``NotCalled`` when the global cap is reached. Waits while another worker holds the
        claim: its lease runs out if it dies."""
        assert isinstance(self.pool, PostgresPool)
        pool = self.pool
        deadline = time.monotonic() + max(600.0, 2 * pool.lease_s)
        while True:
            state = await self.thread.call(pool.claim, draft.query)
            if state == "claimed":
                return None
            if state == "budget":
                raise NotCalled("the shared pool's teacher budget is spent (ledger cap reached)")
            if state == "pooled":
                twin = await self.thread.call(pool.demo_like, draft.query)
                if twin is not None:
                    return reused_annotation(twin)
            if time.monotonic() > deadline:
                raise NotCalled("another worker holds the claim on this image and prompt; gave up waiting")
            await asyncio.sleep(0.05)

    def _draft_for(self, qid: str) -> Draft:
        """The in-memory draft, or one rebuilt from the store after a restart."""
        draft = self._drafts.get(qid)
        if draft is not None:
            return draft
        row = self.store.get(qid)
        if row is None or row["image_png"] is None:
            raise ICDError(f"query {qid} cannot be resumed: no stored image")
        q = Query(
            id=qid,
            image=png_to_image(row["image_png"]),
            prompt=row["prompt"],
            options=tuple(json.loads(row["options"])) if row["options"] else None,
            label=row["label"],
            position=row["position"],
        )
        ids = json.loads(row["demo_ids"])
        pooled = {d.id: d for d in self.pool.demos()}
        u = row["uncertainty"] if row["uncertainty"] is not None else math.nan
        draft = Draft(
            query=q,
            embeddings=self.distiller.embedder.embed_query(q),
            demos=[pooled[i] for i in ids if i in pooled],
            first=Prediction(answer=row["answer"]),
            uncertainty=u,
            ctx=GateContext(
                row["position"], row["ctx_teacher_calls"], row["ctx_pool_size"], row["ctx_kind"] or ""
            ),
            decision=GateDecision(True, row["gate_reason"] or ""),
            stored=self.pool.annotation_for(qid),  # paid for before the crash: never bought twice
            asked=True,
            reason=row["gate_reason"] or "",
            t0=time.perf_counter(),
            t_embed=0.0,
        )
        self._drafts[qid] = draft
        return draft

    def _finish(
        self, qid: str, annotation: Annotation | None, error: str | None, refused: str | None = None
    ) -> dict[str, Any]:
        draft = self._draft_for(qid)
        rerun = qid in self._waiters
        rec = self.distiller.annotate_later(
            draft, annotation=annotation, teacher_error=error, rerun=rerun, not_called=refused
        )
        ann = annotation if error is None else None
        # a label reused from another worker, or a spent shared budget: no teacher call after all
        asked = bool(rec["teacher_asked"])
        state = ANSWERED if refused is not None else FAILED if ann is None else ANNOTATED if ann.accepted else REJECTED
        usage = ann.usage if ann is not None else Usage()
        calls, cost = self._charge_attempts(qid, usage) if asked else (usage.calls, usage.cost_usd)
        final_answer, answered_by = rec["answer"], rec["answered_by"]
        if state == ANNOTATED and answered_by == "student" and ann is not None:
            # nobody waited for the student's second pass: the answer to use now is the label itself
            final_answer, answered_by = ann.answer, "teacher"
        closed = self.store.finish_query(
            qid,
            state=state,
            teacher_answer=ann.answer if ann is not None else None,
            final_answer=final_answer,
            answered_by=answered_by,
            pool_status=rec["pool_status"] or ("reused" if rec.get("reused_demo") is not None else None),
            error=error,
            calls=calls,
            cost_usd=cost,
            asked=asked,
            gate_reason=rec["gate_reason"],
        )
        self._drafts.pop(qid, None)
        if not closed:  # another server closed it first (it adopted our work while we stalled)
            return self._public(self.store.get(qid), None)
        old = PENDING_HUMAN if self.cfg.human_teacher else PENDING_TEACHER
        with self._stats_lock:
            self._counts[old] -= 1
            self._counts[state] += 1
            self._ledger["reserved"] -= 1
            if asked:
                self._ledger["failed" if state == FAILED else "paid"] += 1
            else:
                self._ledger["teacher_calls"] -= 1
            self._ledger["cost_usd"] += cost
            self._ledger["requests"] += calls
            if state != ANSWERED:
                self.events["teacher_failures" if state == FAILED else state] += 1
        if self.on_event is not None:
            self.on_event(f"teacher_{state if asked else 'not_called' if state == ANSWERED else 'reused'}", 0.0)
        return self._public(self.store.get(qid), None)

    def _charge_attempts(self, qid: str, usage: Usage) -> tuple[int, float]:
        """Calls and cost of every attempt at ``qid``'s label. An attempt is spent once its request
        was sent (``count_attempt``): one that a crash cut off may have been answered and billed, so
        it counts as the attempt that answered did (bought again, not free). The gate is charged the
        lost attempts too, so ``--max-cost`` holds in real money."""
        row = self.store.get(qid)
        attempts = int(row["attempts"] or 0) if row is not None else 0
        lost = max(0, attempts - 1)
        add_cost = getattr(self.distiller.gate, "add_cost", None)
        for _ in range(lost if add_cost is not None else 0):
            add_cost(usage.cost_usd)
        return usage.calls + lost * max(1, usage.calls), usage.cost_usd * (1 + lost)

    def _wake(self, qid: str, row: dict[str, Any]) -> None:
        for fut in self._waiters.get(qid, []):
            if not fut.done():
                fut.set_result(row)
