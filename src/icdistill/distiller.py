"""The online in-context distillation loop: select, predict, gate, annotate, pool, answer. Knows only protocols."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from icdistill.coverage import StreamDensity, decode_sketch, encode_sketch
from icdistill.errors import DataError, ICDError, TeacherError, TeacherRefused
from icdistill.gate import is_forced, uncertainty_measure
from icdistill.judge import JUDGE_MODES, Judge, JudgeConfig, Judging
from icdistill.protocols import Embedder, Gate, Selector, Student
from icdistill.runlog import RunLog
from icdistill.select import nearest_demo_similarity, question_kind_count
from icdistill.teacher import TestTimeScaling, normalise_answer
from icdistill.types import (
    ANSWER,
    IMAGE,
    Annotation,
    Demo,
    Embeddings,
    GateContext,
    GateDecision,
    Prediction,
    Query,
)

AnswerPolicy = Literal["student", "forward"]

log = logging.getLogger(__name__)


DemoOrder = Literal["best-last", "best-first"]


@dataclass(frozen=True)
class LoopConfig:
    shots: int = 2
    answer: AnswerPolicy = "student"
    uncertainty: str = "entropy"
    # prompt order of the selected demos: small LMs lean on the demo nearest the query, so the most
    # similar one goes last by default
    demo_order: DemoOrder = "best-last"
    # stop the run after this many teacher calls in a row failed (0: never), instead of spending
    # the stream without a teacher
    max_teacher_failures: int = 10
    # the judge (``icdistill.judge``) weighs the student's ICL and zero-shot readings and the pool's
    # vote for option questions: "on" (a reading only where it can change the answer), "full" (every
    # reading of every query, to measure each one), "off" (plain ICL: the reading with demos answers)
    judge: str = "on"

    def __post_init__(self) -> None:
        if self.shots < 0:
            raise ICDError(f"shots must be >= 0, got {self.shots}")
        if self.max_teacher_failures < 0:
            raise ICDError(f"max teacher failures must be >= 0, got {self.max_teacher_failures}")
        if self.answer not in ("student", "forward"):
            raise ICDError(f"answer policy must be 'student' or 'forward', got {self.answer!r}")
        uncertainty_measure(self.uncertainty)
        if self.judge not in JUDGE_MODES:
            raise ICDError(f"judge must be one of {', '.join(JUDGE_MODES)}, got {self.judge!r}")
        if self.demo_order not in ("best-last", "best-first"):
            raise ICDError(f"demo order must be 'best-last' or 'best-first', got {self.demo_order!r}")


@dataclass
class Draft:
    """What ``Distiller.answer_now`` decided for one query, before any teacher call (steps 1-3)."""

    query: Query
    embeddings: Embeddings
    demos: list[Demo]
    first: Prediction
    uncertainty: float
    ctx: GateContext
    decision: GateDecision
    stored: Annotation | None  # an annotation of this query already in the pool (resume)
    asked: bool
    reason: str
    t0: float
    t_embed: float
    sketch: str | None = None  # the query's image sketch in the stream density (for the log)


class Distiller:
    """Runs queries through the six steps of online ICD and logs one record per query."""

    def __init__(
        self,
        student: Student,
        annotator: TestTimeScaling,
        embedder: Embedder,
        selector: Selector,
        gate: Gate,
        pool: Any,  # icdistill.pool.SQLitePool or any Pool with add()/annotation_for()
        config: LoopConfig | None = None,
        log: RunLog | None = None,
        judge: Judging | None = None,
    ) -> None:
        self.student = student
        self.annotator = annotator
        self.embedder = embedder
        self.selector = selector
        self.gate = gate
        self.pool = pool
        self.config = config or LoopConfig()
        self.log = log
        self._measure = uncertainty_measure(self.config.uncertainty)
        self.teacher_calls = 0
        # per query read ahead in a micro-batch: its embeddings, its share of their time and of it all
        self._ahead: dict[str, tuple[Embeddings, float, float]] = {}
        # whether the last teacher failure was a refusal for good (the stream driver stops on a first one)
        self.last_teacher_refused = False
        self.records: list[dict[str, Any]] = []
        # how typical each query is of the stream so far: one of the gate's coverage signals
        self.density = StreamDensity()
        self.judge: Judging | None = judge
        if judge is None and self.config.judge != "off":
            self.judge = Judge(
                student,
                self.config.shots,
                JudgeConfig(skip=self.config.judge == "on"),
                best_last=self.config.demo_order == "best-last",
            )
        if log is not None:
            self._replay(log.records)

    # ------------------------------------------------------------------ resume
    def _replay(self, records: list[dict[str, Any]]) -> None:
        """Restore counters and the gate's state from an earlier run's log."""
        for r in records:
            self.records.append(r)
            if r.get("event") != "query":
                continue
            signals = {k: v for k, v in (r.get("gate_signals") or {}).items() if v is not None}
            ctx = GateContext(
                r["position"], r["ctx_teacher_calls"], r["ctx_pool_size"], r.get("ctx_kind", ""), signals
            )
            self.gate.observe(r["uncertainty"], ctx, r["teacher_asked"])
            replay = getattr(self.student, "replay_events", None)  # what the student learned online
            if replay is not None and r.get("student_events"):
                replay(r["student_events"])
            if self.judge is not None:
                self.judge.replay(r)
            if r.get("stream_sketch"):
                self.density.add(decode_sketch(r["stream_sketch"]))
            self.teacher_calls += int(r["teacher_asked"])
            if r.get("annotation"):
                self._charge(r["annotation"]["usage"]["cost_usd"])

    def _charge(self, cost_usd: float) -> None:
        add_cost = getattr(self.gate, "add_cost", None)  # cost-capped gates track spend
        if add_cost is not None:
            add_cost(cost_usd)

    def _refund(self, ctx: GateContext) -> None:
        """Give back to the gate a call it counted in ``answer_now`` that was not made."""
        refund = getattr(self.gate, "refund", None)  # gates that count their own calls
        if refund is not None:
            refund(ctx)

    def next_position(self) -> int:
        return max((r["position"] for r in self.records), default=-1) + 1

    # ------------------------------------------------------------------ the loop
    def _select(self, query: Query, emb: Embeddings, exclude_self: bool = True) -> list[Demo]:
        """The prompt's demos, in prompt order. The first pass never shows a query its own annotation
        (it may already be pooled on resume); the re-run after a teacher call does."""
        demos = self.selector.select(query, emb, self.pool, self.config.shots + int(exclude_self))
        if exclude_self:
            demos = [d for d in demos if d.query_id != query.id]
        demos = demos[: self.config.shots]
        return demos[::-1] if self.config.demo_order == "best-last" else demos

    def step(self, query: Query) -> dict[str, Any]:
        """One query through the whole loop: ``annotate_later(answer_now(query))``."""
        return self.annotate_later(self.answer_now(query))

    def _read(self, query: Query, emb: Embeddings, demos: list[Demo], exclude: list[int]) -> Prediction:
        """The student's answer shown ``demos``: judged, or its plain ICL reading. ``exclude``: demos the
        judge's vote must not see."""
        if self.judge is not None:
            return self.judge.answer(query, emb, demos, self.pool, exclude=exclude)
        return self.student.predict(query, demos)

    def _prepare(self, query: Query) -> tuple[Embeddings, list[Demo], float, float]:
        t0 = time.perf_counter()
        ahead = self._ahead.pop(query.id, None)
        if ahead is None:
            emb = self.embedder.embed_query(query)
            t_embed = time.perf_counter() - t0
        else:  # embedded by a micro-batch's read-ahead: its share of the embedding and of all its time
            emb, t_embed, total_share = ahead
            t0 -= total_share
        return emb, self._select(query, emb), t0, t_embed  # 1. select demonstrations

    def answer_now(self, query: Query) -> Draft:
        """Steps 1-3 (select, student pass, gate): what a service can answer before any teacher call.

        The gate observes the query and a teacher call is counted here, so queries answered while an
        annotation is still pending see the spend."""
        return self._answer(query, *self._prepare(query))

    def read_ahead(self, queries: Sequence[Query]) -> None:
        """Read a micro-batch's student passes ahead (``--batch``): its images through the image model
        together, then, in one batched call (``Student.prefetch``, for students that have it), the
        readings each query will ask for: with the demos the pool gives it now, and without (the
        judge's zero-shot reading, where it is not cached and the judge has lately needed it). Nothing
        learned changes here: the queries are then answered one at a time, as with ``--batch 1``
        (within float tolerance), and find their readings ready (a query whose demos changed
        meanwhile is read afresh)."""
        self._ahead.clear()
        if len(queries) < 2:
            return
        start = time.perf_counter()
        embed_many = getattr(self.embedder, "embed_queries", None)
        embs = (
            embed_many(queries) if embed_many is not None else [self.embedder.embed_query(q) for q in queries]
        )
        embedded = time.perf_counter() - start
        prefetch = getattr(self.student, "prefetch", None)
        if prefetch is not None:
            self._prefetch(prefetch, queries, embs)
        n, spent = len(queries), time.perf_counter() - start
        self._ahead = {q.id: (e, embedded / n, spent / n) for q, e in zip(queries, embs, strict=True)}

    def _prefetch(
        self, prefetch: Callable[..., None], queries: Sequence[Query], embs: list[Embeddings]
    ) -> None:
        asked: list[Query] = []
        shown: list[list[Demo]] = []
        for q, emb in zip(queries, embs, strict=True):
            demos = self._select(q, emb)
            asked.append(q)
            shown.append(demos)
            if demos and self.judge is not None and self.judge.needs_zero_shot(q):
                asked.append(q)
                shown.append([])
        try:
            prefetch(asked, shown)
        except Exception as e:  # noqa: BLE001 - each query reads again, and raises, one at a time
            log.warning("reading a micro-batch ahead failed (%s); its queries are read one at a time", e)

    def _answer(
        self,
        query: Query,
        emb: Embeddings,
        demos: list[Demo],
        t0: float,
        t_embed: float,
    ) -> Draft:
        stored = self.pool.annotation_for(query.id)
        # a recovered annotation's own demo was not in the pool when the gate first saw this query
        own_ids = [d.id for d in self.pool.demos() if d.query_id == query.id] if stored is not None else []
        first = self._read(query, emb, demos, own_ids)  # 2. student pass
        u = self._measure(first)
        own = int(bool(own_ids))
        kind = "options" if query.options else "open"  # uncertainty scales differ: per-kind gate statistics
        signals, sketch = self._coverage(query, emb, own_ids)
        ctx = GateContext(
            query.position, self.teacher_calls, question_kind_count(query, self.pool) - own, kind, signals
        )
        decision = self.gate.decide(u, ctx)  # 3. gate
        asked = decision.ask or stored is not None
        reason = "recovered from pool after a crash" if stored is not None else decision.reason
        if asked and stored is None:
            twin = getattr(self.pool, "demo_like", lambda q: None)(query)
            if twin is not None:  # the same image and prompt is pooled: its answer is already bought
                asked = False
                reason = f"{decision.reason}; not asked: same image and prompt as demo {twin.id}"
        self.gate.observe(u, ctx, asked)
        if asked:
            self.teacher_calls += 1
        return Draft(query, emb, demos, first, u, ctx, decision, stored, asked, reason, t0, t_embed, sketch)

    def _coverage(
        self, query: Query, emb: Embeddings, own_ids: list[int]
    ) -> tuple[dict[str, float], str | None]:
        """The gate's coverage signals (how near the closest pooled demo of the query's kind is; how
        typical the query is of the stream so far) and the query's sketch, added to the stream.
        ``own_ids``: the query's own demos, pooled before a crash; left out, as the gate first saw it."""
        signals: dict[str, float] = {}
        near = nearest_demo_similarity(query, emb, self.pool, exclude=own_ids)
        if near is not None:
            signals["nearest_demo_similarity"] = near
        vec = emb.get(IMAGE)
        if vec is None:
            return signals, None
        sketch = self.density.sketch(vec)
        typical = self.density.typicality(sketch)
        if typical is not None:
            signals["typicality"] = typical
        self.density.add(sketch)
        return signals, encode_sketch(sketch)

    def ask_teacher(self, draft: Draft) -> Annotation:
        """Step 4 (teacher test-time scaling), or the annotation already stored for this query.

        Touches neither the pool nor the gate, so a service may run it off the loop's thread.
        Raises ``TeacherError``."""
        return draft.stored or self.annotator.annotate(draft.query)

    def annotate_later(
        self,
        draft: Draft,
        annotation: Annotation | None = None,
        teacher_error: str | None = None,
        rerun: bool = True,
        not_called: str | None = None,
    ) -> dict[str, Any]:
        """Steps 4-6 (teacher, pool update, answer) for a query ``answer_now`` sent to the teacher, and
        its log record. Without ``annotation`` or ``teacher_error`` the teacher is asked here; a service
        passes the annotation it got elsewhere (a background call, a person). ``rerun=False`` skips the
        student's second pass (nobody waits for it) and answers with the first."""
        query, emb, demos, first, stored = (
            draft.query,
            draft.embeddings,
            draft.demos,
            draft.first,
            draft.stored,
        )
        pool_status: str | None = None
        failed_seconds, failed_faults = 0.0, 0  # what a failed teacher call cost
        # no call was made: a shared pool's global budget said no (here, or to a service's claim)
        refused: str | None = not_called
        if draft.asked and annotation is None and teacher_error is None and refused is None:
            try:
                annotation = self.ask_teacher(draft)  # 4. teacher test-time scaling
            except TeacherError as e:
                if getattr(e, "not_called", False):
                    refused = str(e)
                else:
                    teacher_error = str(e)
                    self.last_teacher_refused = isinstance(e, TeacherRefused)
                    failed_seconds = float(getattr(e, "seconds", 0.0))
                    failed_faults = int(getattr(e, "faults", 1))
        if not draft.asked:
            annotation = None
        asked, reason = draft.asked, draft.reason
        reused = getattr(annotation, "reused_demo", None)
        if reused is not None:
            # another worker of a shared pool bought this label while we waited for its claim: a pool
            # hit, not a teacher call of ours (the gate counted one in answer_now: take it back)
            self.teacher_calls -= 1
            self._refund(draft.ctx)
            asked, reason = (
                False,
                f"{draft.reason}; not asked: bought by another worker meanwhile (demo {reused})",
            )
        elif refused is not None:
            # not a teacher failure (a run must not stop on it), and not a call of ours either
            self.teacher_calls -= 1
            self._refund(draft.ctx)
            asked, reason = False, f"{draft.reason}; not asked: {refused}"
        if annotation is not None and reused is None:
            # once, always: a recovered annotation was never logged, so replay did not charge it
            self._charge(annotation.usage.cost_usd)
            answer_emb = self.embedder.embed_texts([annotation.answer or " "])[0]
            _, pool_status = self.pool.add(query, annotation, {**emb, ANSWER: answer_emb})  # 5. pool update
            learn = getattr(self.student, "learn", None)  # online learners (e.g. a LoRA baseline) train here
            if learn is not None and annotation.accepted:
                learn(query, annotation.answer)
            if self.judge is not None and annotation.accepted:  # a check of each of the judge's experts
                self.judge.teach(query, emb, first, annotation.answer, demos, self.pool)

        final, answered_by, final_demos = first, "student", demos  # 6. answer
        if annotation is not None and annotation.accepted:
            if self.config.answer == "forward":
                answered_by = "teacher"
            elif rerun:
                final_demos = self._select(query, emb, exclude_self=False)
                final = self._read(query, emb, final_demos, [])
                answered_by = "student+new-demo"
        answer = annotation.answer if answered_by == "teacher" and annotation else final.answer
        u, ctx, decision = draft.uncertainty, draft.ctx, draft.decision

        rec: dict[str, Any] = {
            "event": "query",
            "position": query.position,
            "query_id": query.id,
            "label": query.label,
            "answer": answer,
            "correct": is_correct(answer, query) if query.label is not None else None,
            "first_answer": first.answer,
            "first_correct": is_correct(first.answer, query) if query.label is not None else None,
            "answered_by": answered_by,
            "uncertainty": u,
            "teacher_asked": asked,
            "gate_reason": reason,
            "gate_threshold": decision.threshold,
            "ctx_teacher_calls": ctx.teacher_calls,
            "ctx_pool_size": ctx.pool_size,
            "ctx_kind": ctx.kind,
            "gate_signals": dict(ctx.signals),
            "gate_score": decision.score,
            "gate_forced": is_forced(decision.reason),
            "stream_sketch": draft.sketch,
            "annotation": _annotation_record(annotation) if reused is None else None,
            "reused_demo": reused,
            "teacher_error": teacher_error,
            "teacher_error_faults": failed_faults,
            "pool_status": pool_status,
            "pool_size": len(self.pool),
            "demo_ids": [d.id for d in demos],
            "demo_answers": [d.answer for d in demos],
            # the demo the student sees as nearest (last in the prompt by default): a student that
            # merely copies it answers this every time
            "nearest_demo_answer": (demos[-1] if self.config.demo_order == "best-last" else demos[0]).answer
            if demos
            else None,
            "student_details": first.details or None,
            "demo_accuracy": _demo_accuracy(demos, query.label),
            "final_demo_ids": [d.id for d in final_demos],
            "option_probs": first.option_probs() or None,
            "seconds": {
                "embed": draft.t_embed,
                "student": first.seconds + (final.seconds if final is not first else 0.0),
                "teacher": (annotation.seconds if annotation and stored is None else 0.0) + failed_seconds,
                "total": time.perf_counter() - draft.t0,
            },
        }
        drain = getattr(self.student, "drain_events", None)
        if drain is not None:  # replayed on resume, so a resumed run answers as an uninterrupted one
            rec["student_events"] = drain()
        if self.judge is not None:
            rec["judge_events"] = self.judge.drain_events()
        return rec

    def _write(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if self.log is not None:
            self.log.append(rec)

    def run(
        self,
        queries: Iterable[Query | DataError],
        on_record: Callable[[dict[str, Any]], None] | None = None,
        *,
        teacher_concurrency: int = 1,
        batch: int = 1,
    ) -> list[dict[str, Any]]:
        """Process a stream (``icdistill.flow.run_stream``: at most ``teacher_concurrency`` teacher calls
        in flight, ``batch`` queries a student pass; 1 and 1: one query at a time, start to finish). A
        ``DataError`` item (e.g. a corrupt image) is logged and skipped.

        Raises ``TeacherUnavailable`` after ``max_teacher_failures`` failed teacher calls in a row, or at
        a first call the server refused for good; the query of the last failure is not logged, so a
        resumed run asks for it again."""
        from icdistill.flow import run_stream  # the driver steps a Distiller: imported here, not at the top

        return run_stream(self, queries, on_record, teacher_concurrency=teacher_concurrency, batch=batch)


def is_correct(answer: str, query: Query) -> bool:
    """An option must be the label itself; an open answer counts when its normalised form (VQA style:
    case, punctuation, articles) equals the label's."""
    if query.options:
        return answer == query.label
    return normalise_answer(answer) == normalise_answer(query.label or "")


def _demo_accuracy(demos: list[Demo], label: str | None) -> float | None:
    if not demos or label is None:
        return None
    return sum(d.answer == label for d in demos) / len(demos)


def _annotation_record(a: Annotation | None) -> dict[str, Any] | None:
    if a is None:
        return None
    d = asdict(a)
    d["usage"] = asdict(a.usage)
    return d
