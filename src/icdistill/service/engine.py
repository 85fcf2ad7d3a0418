"""The service's loop host: one Distiller shared with ``icd run``, driven from HTTP requests.

Threads: the event loop only parses requests and awaits. Everything that touches the Distiller, the
pool or the store runs on one "loop thread", in order (student inference, SQLite writes), so the loop
state needs no locks and the event loop never runs a model. Teacher requests run on a separate pool of
``teacher_concurrency`` threads, so a slow teacher never holds up the student's answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import threading
import time
import uuid
import zipfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from icdistill.distiller import Distiller, Draft
from icdistill.errors import ICDError, NotCalled, TeacherError
from icdistill.gate import make_gate
from icdistill.pool import PostgresPool, SQLitePool, is_postgres_url, reused_annotation
from icdistill.select import make_selector
from icdistill.service.archive import ImportLimits, read_import
from icdistill.service.config import ServeConfig
from icdistill.service.errors import conflict, not_found
from icdistill.service.human import HumanTeacher, LabelQueue, human_annotation
from icdistill.service.images import png_b64
from icdistill.service.store import (
    ANNOTATED,
    ANSWERED,
    FAILED,
    PENDING_HUMAN,
    PENDING_TEACHER,
    REJECTED,
    ServiceStore,
    Store,
)
from icdistill.service.store_pg import PostgresServiceStore
from icdistill.service.validate import DemoRecord, check_prompt_cost, demo_record, token_counter
from icdistill.teacher import TestTimeScaling
from icdistill.types import (
    ANSWER,
    Annotation,
    GateContext,
    GateDecision,
    Prediction,
    Query,
    Usage,
    image_to_png,
    png_to_image,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class LoopThread:
    """A single worker thread that owns the loop state; ``await call(fn)`` runs ``fn`` there."""

    def __init__(self) -> None:
        self._ex = ThreadPoolExecutor(1, thread_name_prefix="icd-loop")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._ex, partial(fn, *args, **kwargs))

    def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        return self._ex.submit(fn, *args).result()

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` there without waiting for it (a clean-up that must not be cancelled)."""
        with contextlib.suppress(RuntimeError):  # shut down already
            self._ex.submit(fn, *args).add_done_callback(_log_failure)

    def close(self) -> None:
        self._ex.shutdown(wait=True, cancel_futures=True)


def _log_failure(fut: Future[Any]) -> None:
    """Nobody waits for a posted clean-up: its failure is logged, not dropped with the future."""
    if not fut.cancelled() and fut.exception() is not None:
        log.error("a clean-up on the loop thread failed", exc_info=fut.exception())


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    a = np.asarray(values)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


class Engine:
    """Answers queries now, annotates them later (a teacher in the background, or a person), and keeps
    the pool, the labelling queue and the budget ledger in one SQLite file, or in a PostgreSQL
    database shared with other ``icd serve`` processes and ``icd run`` workers (``--pool
    postgresql://...``): then a label is claimed in the pool before the teacher is called (bought once
    across servers, within the pool's global call cap), and a sweep every second renews this server's
    leases, adopts the teacher work of dead servers, and wakes waiters whose query another server
    finished."""

    def __init__(self, cfg: ServeConfig, parts: Any = None) -> None:
        self.cfg = cfg
        self.thread = LoopThread()
        self._drafts: dict[str, Draft] = {}
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._start_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.latencies: deque[float] = deque(maxlen=5000)
        self.events: dict[str, int] = {"queries": 0, "teacher_failures": 0, "rejected": 0, "annotated": 0}
        self.on_event: Callable[[str, float], None] | None = None  # metrics hook
        self._teacher_pool = ThreadPoolExecutor(cfg.teacher_concurrency, thread_name_prefix="icd-teacher")
        self._resume: list[str] = []
        self._inflight: set[str] = set()
        self._pool_ledger: dict[str, Any] | None = None
        try:
            self.thread.call_sync(self._open, parts)
        except BaseException:
            self._teacher_pool.shutdown(wait=False)
            self.thread.close()
            raise

    # ------------------------------------------------------------------ setup (loop thread)
    def _open(self, parts: Any) -> None:
        from icdistill.models.registry import ModelContext, resolve_embedder, resolve_student, resolve_teacher

        cfg = self.cfg
        run = cfg.run_config()
        if parts is None:
            ctx = ModelContext(seed=cfg.seed)
            student, embedder = resolve_student(cfg.student, ctx), resolve_embedder(cfg.embedder, ctx)
            teacher = HumanTeacher() if cfg.human_teacher else resolve_teacher(cfg.teacher, ctx)
        else:
            student, teacher, embedder = parts.student, parts.teacher, parts.embedder
            if cfg.human_teacher:
                teacher = HumanTeacher()
        self.teacher_name = "human" if cfg.human_teacher else getattr(teacher, "name", cfg.teacher)
        self.pool: SQLitePool | PostgresPool
        self.store: Store
        if is_postgres_url(cfg.pool):
            # many servers on one database: the pool's claims and ledger are shared, so is the queue
            self.pool = PostgresPool(
                cfg.pool,
                max_size=cfg.pool_max,
                max_calls=cfg.max_calls,
                max_cost_usd=cfg.max_cost_usd,
                lease_s=cfg.claim_lease_s,
            )
            try:
                self.store = PostgresServiceStore(cfg.pool, self.pool.worker, cfg.claim_lease_s)
            except BaseException:
                self.pool.close()
                raise
        else:
            # one service per pool file: a second process on it would fork the queue and the ledger
            self.pool = SQLitePool(cfg.pool, max_size=cfg.pool_max, lock=True)
            self.store = ServiceStore(cfg.pool)
        self.distiller = Distiller(
            student=student,
            annotator=TestTimeScaling(teacher, n=cfg.samples, agreement_floor=cfg.agreement),
            embedder=embedder,
            selector=make_selector(cfg.selector, seed=cfg.seed, k_tt=cfg.k_tt, k_it=cfg.k_it),
            gate=make_gate(
                cfg.gate,
                budget=cfg.budget,
                delta=cfg.delta,
                warmup=cfg.warmup,
                score=cfg.gate_score,
                max_calls=cfg.max_calls,
                max_cost_usd=cfg.max_cost_usd,
                seed=cfg.seed,
            ),
            pool=self.pool,
            config=run.loop_config(),
        )
        self.labels = LabelQueue(self.store, cfg.label_lease_s)
        self._prompt_tokens = token_counter(student)
        self._restore()
        self._warm_up(student, embedder)

    @staticmethod
    def _warm_up(student: Any, embedder: Any) -> None:
        """Load lazily loaded local models now, so the first request does not pay for it (measured: ~50 s
        on a loaded 2-core machine). Never calls ``predict``: a student may be a paid API."""
        load = getattr(student, "lm", None)
        if callable(load):
            load()
        embedder.embed_query(Query(id="warm-up", image=Image.new("RGB", (32, 32)), prompt="warm-up"))
        embedder.embed_texts(["warm-up"])

    def _restore(self) -> None:
        """Replay the gate and the budget from the store, and find the work a crash interrupted."""
        gate, d = self.distiller.gate, self.distiller
        for r in self.store.gate_history():
            u = r["uncertainty"] if r["uncertainty"] is not None else math.nan
            gate.observe(
                u,
                GateContext(r["position"], r["ctx_teacher_calls"], r["ctx_pool_size"], r["ctx_kind"] or ""),
                bool(r["teacher_asked"]),
            )
            d.teacher_calls += int(r["teacher_asked"])
        ledger = self.store.ledger_totals()
        add_cost = getattr(gate, "add_cost", None)
        if add_cost is not None:
            add_cost(ledger["cost_usd"])
        self.store.release_all()  # leases of labellers from before the restart
        # a shared store's pending work may be another live server's: the sweep adopts orphans only
        self._resume = [] if self.store.shared else [r["query_id"] for r in self.store.pending(PENDING_TEACHER)]
        with self._stats_lock:
            self._counts = self.store.counts()
            self._ledger = ledger
        if isinstance(self.pool, PostgresPool):
            self._pool_ledger = self.pool.ledger_state()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Resume teacher calls a crash interrupted (needs the running event loop); idempotent."""
        with self._start_lock:
            if self._started:
                return
            self._started = True
            resume, self._resume = self._resume, []
        for qid in resume:
            self._spawn(qid)
        if resume:
            log.info("resuming %d teacher requests interrupted by a restart", len(resume))
        if self.store.shared:
            task = asyncio.get_running_loop().create_task(self._sweep_loop())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._teacher_pool.shutdown(wait=False, cancel_futures=True)
        self.thread.call_sync(self._close_db)
        self.thread.close()

    def close(self) -> None:
        self._teacher_pool.shutdown(wait=False, cancel_futures=True)
        self.thread.call_sync(self._close_db)
        self.thread.close()

    def _close_db(self) -> None:
        self.pool.close()
        self.store.close()

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
                    await self.thread.call(self.store.count_attempt, qid)
                loop = asyncio.get_running_loop()
                try:
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

    # ------------------------------------------------------------------ many servers, one database
    async def _sweep_loop(self) -> None:
        tick = min(1.0, self.cfg.claim_lease_s / 3)
        while True:
            try:
                # on their own connections, off the loop thread: a queue of student passes there
                # must not let this live server's leases run out. Only the work in flight here: one
                # whose attempt failed (a lost connection) lapses and is adopted again, not held forever
                await asyncio.to_thread(self._heartbeat, sorted(self._inflight))
                orphans, finished = await self.thread.call(self._sweep)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep of the shared store failed; retrying")
                orphans, finished = [], {}
            for qid, row in finished.items():
                self._wake(qid, row)
            for qid in orphans:
                if qid not in self._inflight:
                    self._spawn(qid)
            if orphans:
                log.info("adopted %d teacher requests of a server that went silent", len(orphans))
            await asyncio.sleep(tick)

    def _heartbeat(self, query_ids: list[str]) -> None:
        assert isinstance(self.pool, PostgresPool)
        self.store.heartbeat(query_ids)
        self.pool.renew_claims(query_ids)

    def _sweep(self) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """Adopt expired work, refresh the stats mirrors, and find waited-on queries another server
        closed (loop thread)."""
        assert isinstance(self.pool, PostgresPool)
        orphans = self.store.adopt_orphans()
        self.pool.refresh()
        finished: dict[str, dict[str, Any]] = {}
        for qid in list(self._waiters):
            row = self.store.get(qid)
            if row is not None and row["state"] not in (PENDING_TEACHER, PENDING_HUMAN):
                finished[qid] = self._public(row, None)
        counts, ledger, pool_ledger = self.store.counts(), self.store.ledger_totals(), self.pool.ledger_state()
        with self._stats_lock:
            self._counts, self._ledger, self._pool_ledger = counts, ledger, pool_ledger
        return orphans, finished

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

    # ------------------------------------------------------------------ a person labels
    async def next_label_item(self, labeller: str) -> dict[str, Any] | None:
        item = await self.thread.call(self.labels.next_item, labeller)
        if item is None:
            return None
        item["image_b64"] = png_b64(png_to_image(item["image_png"])) if item["image_png"] else None
        item["options_list"] = json.loads(item["options"]) if item["options"] else None
        return item

    async def skip_label(self, qid: str, labeller: str) -> None:
        await self.thread.call(self.labels.skip, qid, labeller)

    async def submit_label(self, qid: str, label: str, labeller: str) -> dict[str, Any]:
        if not self.cfg.human_teacher:
            raise conflict("this service's teacher is a model, not a person")
        row = await self.thread.call(self._label, qid, label, labeller)
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

    # ------------------------------------------------------------------ reading state
    async def query(self, qid: str) -> dict[str, Any]:
        row = await asyncio.to_thread(self.store.read, qid)  # never queued behind model passes
        if row is None:
            raise not_found(f"no query {qid}")
        return self._public(row, None)

    async def saved_label(self, qid: str) -> str | None:
        """The label a person gave query ``qid`` (the /label page's confirmation), else None."""
        row = await asyncio.to_thread(self.store.read, qid)
        if row is None or not str(row.get("teacher") or "").startswith("human"):
            return None
        return row["teacher_answer"]

    @staticmethod
    def _public(row: dict[str, Any] | None, first: Prediction | None) -> dict[str, Any]:
        assert row is not None
        out = {
            "query_id": row["query_id"],
            "position": row["position"],
            "state": row["state"],
            "answer": row["final_answer"] or row["answer"],
            "student_answer": row["answer"],
            "uncertainty": _finite(row["uncertainty"]),
            "teacher_asked": bool(row["teacher_asked"]),
            "gate_reason": row["gate_reason"],
            "demo_ids": json.loads(row["demo_ids"]),
            "teacher_answer": row["teacher_answer"],
            "answered_by": row["answered_by"] or "student",
            "pool_status": row["pool_status"],
            "error": row["error"],
        }
        if row.get("ledger_state") is not None:
            out["ledger"] = {
                "state": row["ledger_state"],
                "teacher": row["teacher"],
                "attempts": row["attempts"],
                "calls": row["calls"],
                "cost_usd": row["cost_usd"],
            }
        if first is not None and first.option_scores:
            out["option_probs"] = {k: _finite(v) for k, v in first.option_probs().items()}
        return out

    def stats(self) -> dict[str, Any]:
        """From in-memory mirrors of the store: never waits for the loop thread."""
        with self._stats_lock:
            counts = dict(self._counts)
            ledger = dict(self._ledger)
            lat = list(self.latencies)
        queries = sum(counts.values())
        calls = ledger["teacher_calls"]
        cfg = self.cfg
        pool_ledger = self._pool_ledger
        return {
            # a shared pool is read on the loop thread only: its size as last synced
            "pool_size": self.pool.known_size() if isinstance(self.pool, PostgresPool) else len(self.pool),
            "queries": queries,
            "teacher": self.teacher_name,
            "teacher_calls": calls,
            "teacher_call_rate": calls / queries if queries else 0.0,
            "pending": counts[PENDING_TEACHER] + counts[PENDING_HUMAN],
            "pending_teacher": counts[PENDING_TEACHER],
            "pending_human": counts[PENDING_HUMAN],
            "states": counts,
            "budget": {
                "gate": cfg.gate,
                "target_rate": cfg.budget if cfg.gate in ("budget", "random") else None,
                "calls_spent": calls,
                "calls_cap": cfg.max_calls,
                "calls_left": max(0, cfg.max_calls - calls) if cfg.max_calls is not None else None,
                "usd_spent": ledger["cost_usd"],
                "usd_cap": cfg.max_cost_usd,
                "usd_left": max(0.0, cfg.max_cost_usd - ledger["cost_usd"])
                if cfg.max_cost_usd is not None
                else None,
                "teacher_requests": ledger["requests"],
                "paid": ledger["paid"],
                "failed": ledger["failed"],
                "reserved": ledger["reserved"],
                # a shared pool's global ledger: calls bought by every worker on it, and its cap
                "pool_ledger": pool_ledger,
            },
            "latency_seconds": _percentiles(lat),
        }

    # ------------------------------------------------------------------ demos
    async def list_demos(self, offset: int, limit: int) -> dict[str, Any]:
        return await self.thread.call(self._list_demos, offset, limit)

    def _list_demos(self, offset: int, limit: int) -> dict[str, Any]:
        demos = sorted(self.pool.demos(), key=lambda d: d.id)
        return {
            "total": len(demos),
            "offset": offset,
            "limit": limit,
            "demos": [self._demo(d, image=False) for d in demos[offset : offset + limit]],
        }

    @staticmethod
    def _demo(d: Any, image: bool) -> dict[str, Any]:
        out = {
            "id": d.id,
            "query_id": d.query_id,
            "prompt": d.prompt,
            "label": d.answer,
            "options": d.provenance.get("options"),
            "teacher": d.provenance.get("teacher"),
            "agreement": d.provenance.get("agreement"),
        }
        if image:
            out["image_b64"] = png_b64(d.image) if d.image is not None else None
        return out

    async def get_demo(self, demo_id: int) -> dict[str, Any]:
        return await self.thread.call(self._get_demo, demo_id)

    def _get_demo(self, demo_id: int) -> dict[str, Any]:
        try:
            return self._demo(self.pool.get(demo_id), image=True)
        except KeyError:
            raise not_found(f"no demo {demo_id} in the pool") from None

    async def delete_demo(self, demo_id: int) -> None:
        if not await self.thread.call(self.pool.remove, demo_id):
            raise not_found(f"no demo {demo_id} in the pool")

    async def add_demo(self, image: Image.Image, fields: dict[str, Any]) -> dict[str, Any]:
        """A hand-added demo (``POST /v1/demos``), checked as every demo is."""
        rec = demo_record(fields, image, f"manual-{uuid.uuid4().hex}", "manual")
        out = await self.thread.call(self._add_demos, [rec])
        return {"id": out["ids"][0], "status": out["statuses"][0], "pool_size": out["pool_size"]}

    def _add_demos(self, records: list[DemoRecord]) -> dict[str, Any]:
        """Pool checked demos, all or none: every embedding is computed before the first write, and a
        failed write takes back the demos already added."""
        embedder = self.distiller.embedder
        for rec in records:  # a demo's prompt is in every prompt that shows the demo
            check_prompt_cost(rec.prompt, self._prompt_tokens, self.cfg.max_prompt_tokens)
        items = []
        for rec in records:
            q = Query(
                id=rec.query_id,
                image=rec.image,
                prompt=rec.prompt,
                options=tuple(rec.options) if rec.options else None,
                position=-1,
            )
            ann = Annotation(
                answer=rec.label,
                samples=[rec.label],
                votes=rec.votes,
                agreement=rec.agreement,
                accepted=True,
                teacher=rec.teacher,
            )
            emb = embedder.embed_query(q)
            emb[ANSWER] = embedder.embed_texts([rec.label])[0]
            items.append((q, ann, emb))
        ids: list[int | None] = []
        statuses: list[str] = []
        try:
            for q, ann, emb in items:
                demo, status = self.pool.add(q, ann, emb)
                ids.append(demo.id if demo is not None else None)
                statuses.append(status)
        except BaseException:
            for demo_id, status in zip(ids, statuses, strict=True):
                if status == "added" and demo_id is not None:
                    self.pool.remove(demo_id)
            raise
        return {"ids": ids, "statuses": statuses, "pool_size": len(self.pool)}

    # ------------------------------------------------------------------ export / import
    async def export_archive(self) -> bytes:
        return await self.thread.call(self._export)

    def _export(self) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            lines = []
            for d in sorted(self.pool.demos(), key=lambda d: d.id):
                rec = self._demo(d, image=False)
                rec["votes"] = d.provenance.get("votes") or {}
                if d.image is not None:
                    rec["image"] = f"images/{d.id}.png"
                    z.writestr(rec["image"], image_to_png(d.image))
                lines.append(json.dumps(rec))
            z.writestr("demos.jsonl", "\n".join(lines) + ("\n" if lines else ""))
        return buf.getvalue()

    async def import_archive(self, data: bytes) -> dict[str, Any]:
        cfg = self.cfg
        limits = ImportLimits(cfg.max_pixels, cfg.max_import_pixels, cfg.max_import_bytes)
        records = await asyncio.to_thread(read_import, data, limits)
        out = await self.thread.call(self._add_demos, records)
        statuses: dict[str, int] = {}
        for status in out["statuses"]:
            statuses[status] = statuses.get(status, 0) + 1
        return {"imported": statuses.get("added", 0), "statuses": statuses, "pool_size": out["pool_size"]}
