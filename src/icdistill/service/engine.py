"""The service's loop host: one Distiller shared with ``icd run``, driven from HTTP requests.

Threads: the event loop only parses requests and awaits. Everything that touches the Distiller, the
pool or the store runs on one "loop thread", in order (student inference, SQLite writes), so the loop
state needs no locks and the event loop never runs a model. Teacher requests run on a separate pool of
``teacher_concurrency`` threads, so a slow teacher never holds up the student's answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from icdistill.distiller import Distiller, Draft
from icdistill.errors import ServiceError
from icdistill.gate import make_gate
from icdistill.pool import LISTEN_URL_ENV, PostgresPool, SQLitePool, is_postgres_url, shared_index_from_env
from icdistill.select import make_selector
from icdistill.service.answering import _Answering
from icdistill.service.config import ServeConfig
from icdistill.service.errors import not_found
from icdistill.service.human import HumanTeacher, LabelQueue
from icdistill.service.images import png_b64
from icdistill.service.import_export import _ImportExport
from icdistill.service.labelling import _Labelling
from icdistill.service.leases import _Leases
from icdistill.service.loop_thread import LoopThread
from icdistill.service.store import (
    PENDING_HUMAN,
    PENDING_TEACHER,
    ServiceStore,
    Store,
)
from icdistill.service.store_pg import PostgresServiceStore
from icdistill.service.teacher_queue import _TeacherQueue
from icdistill.service.validate import DemoRecord, check_prompt_cost, demo_record, token_counter
from icdistill.teacher import TestTimeScaling
from icdistill.types import (
    ANSWER,
    Annotation,
    GateContext,
    Prediction,
    Query,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    a = np.asarray(values)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


class Engine(_Answering, _TeacherQueue, _Leases, _Labelling, _ImportExport):
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
                listen_url=os.environ.get(LISTEN_URL_ENV) or None,
                shared_index=shared_index_from_env(),  # servers on one host map one saved index
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
        self._undo_cut_imports()
        self.labels = LabelQueue(self.store, cfg.label_lease_s)
        self._prompt_tokens = token_counter(student)
        self._restore()
        self._warm_up(student, embedder)

    def _undo_cut_imports(self) -> None:
        """An import a crash cut off leaves nothing in the pool (its demos are taken out and deleted)."""
        rows = self.store.unfinished_import_rows()
        for demo_id in rows:
            self.pool.remove(demo_id)
        self.store.undo_imports()
        if rows:
            log.warning("took back %d demos of an import that a crash cut off (all or nothing)", len(rows))

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
        # --max-calls caps requests paid: those a crash cut off and a restart sent again count too
        d.teacher_calls += ledger["rebought"]
        add_cost = getattr(gate, "add_cost", None)
        if add_cost is not None:
            add_cost(ledger["cost_usd"])
        self.store.release_all()  # leases of labellers from before the restart
        # a shared store's pending work may be another live server's: the sweep adopts orphans only
        self._resume = [] if self.store.shared else [r["query_id"] for r in self.store.pending(PENDING_TEACHER)]
        self.ended_sessions = self.store.ended_sessions()
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

    def typical_seconds(self) -> float | None:
        """The median of the latest predictions' latencies (None before the first)."""
        with self._stats_lock:
            lat = list(self.latencies)[-200:]
        return float(np.median(lat)) if lat else None

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
                # requests a crash cut off and a restart sent again (paid twice): in calls_spent too
                "rebought": ledger.get("rebought", 0),
                # a shared pool's global ledger: calls bought by every worker on it, and its cap
                "pool_ledger": pool_ledger,
            },
            "latency_seconds": _percentiles(lat),
            # calls waiting for (or running on) the loop thread: model passes, imports, labels
            "loop_queue": self.thread.queued,
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

    async def end_session(self, sid: str, until: float) -> None:
        """A logout, written before the browser is told (a person waits: ahead of queued predictions)."""
        await self.thread.call_first(self.store.end_session, sid, until)

    def _add_demos(self, records: list[DemoRecord]) -> dict[str, Any]:
        """Pool checked demos, all or none: every embedding is computed before the first write, a
        failed write takes back the demos already added, and so does a restart after a crash
        (``begin_import``)."""
        embedder = self.distiller.embedder
        for rec in records:  # a demo's prompt is in every prompt that shows the demo
            try:
                check_prompt_cost(rec.prompt, self._prompt_tokens, self.cfg.max_prompt_tokens)
            except ServiceError as e:
                raise ServiceError(e.status, e.code, f"{rec.where}: {e.message}" if rec.where else e.message) from e
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
        journal = self.store.begin_import() if len(items) > 1 else None
        try:
            for q, ann, emb in items:
                demo, status = self.pool.add(q, ann, emb)
                ids.append(demo.id if demo is not None else None)
                statuses.append(status)
        except BaseException:
            for demo_id, status in zip(ids, statuses, strict=True):
                if status == "added" and demo_id is not None:
                    self.pool.remove(demo_id)
            if journal is not None:
                self._undo_cut_imports()
            raise
        self.store.end_import(journal)
        return {"ids": ids, "statuses": statuses, "pool_size": len(self.pool)}


