"""The stream driver: runs a ``Distiller`` over a stream with teacher calls in flight and micro-batched
student passes, so the stream never waits for the teacher.

``run_stream(distiller, queries, teacher_concurrency=C, batch=B)``:

- B consecutive queries have their student passes read ahead together (``Distiller.read_ahead``:
  one batched call, with the demos the pool gives each query at the batch's start), then are
  answered one at a time in stream order, as with ``B = 1``: a query finds its readings ready (after
  a teacher call the rest of the batch is read ahead again, with the new demo; with calls in flight a
  query whose demos changed reads afresh). The answers are those of ``B = 1`` within float tolerance
  (batched and single forwards round differently; a near-tie can flip). A call is counted, by the
  gate, the budget and the caps, when ``answer_now`` decides it.
- ``C == 1``: each teacher call is made right away and the stream waits for it (the loop as it always
  was: ``C=1`` gives the very answers of ``Distiller.step`` one query at a time, at any B).
- ``C > 1``: a call the gate decides on goes to a thread pool (``Distiller.ask_teacher``, which
  touches neither the pool nor the gate) and the stream goes on; at most C calls are in flight (the
  stream waits for one to finish before starting another). When an annotation arrives, its query is
  finished on this thread (``Distiller.annotate_later``: the pool commit, then the student's second
  pass), so the pool, the gate and the student are only touched from the thread that called
  ``run_stream``. Later queries see the new demo from then on.

``log.jsonl`` stays in position order: a finished record waits until every earlier position is
written (at most ``window`` queries are held, the stream waits on the oldest call beyond that).
After a crash the log is therefore a prefix of the stream and ``--resume`` starts at its end. A query
whose annotation was committed to the pool but not logged (a later position waiting on an earlier
call, or the crash came between the commit and the write) is recovered from the pool on resume
(``pool.annotation_for``) and not bought again; a call in flight at the crash was never committed,
and is asked again. Records of queries finished while calls were in flight carry ``in_flight``:
the calls in flight when the record was written (the progress bar shows it).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

from icdistill.errors import DataError, ICDError, TeacherError, TeacherRefused, TeacherUnavailable
from icdistill.types import Annotation, Query, image_digest

# at most this many queries wait for an earlier position's call before the stream waits on it
DEFAULT_WINDOW = 256


class Loop(Protocol):
    """What the driver needs of the loop (``icdistill.distiller.Distiller``; a draft is what its
    ``answer_now`` returns): its steps, its records and its log. The loop's ``run`` calls the driver,
    so the driver knows it only through this."""

    config: Any
    log: Any
    pool: Any
    records: list[dict[str, Any]]

    def answer_now(self, query: Query) -> Any: ...

    def read_ahead(self, queries: list[Query]) -> None: ...

    def ask_teacher(self, draft: Any) -> Annotation: ...

    def annotate_later(
        self,
        draft: Any,
        annotation: Annotation | None = None,
        teacher_error: str | None = None,
        rerun: bool = True,
        not_called: str | None = None,
    ) -> dict[str, Any]: ...

    def step(self, query: Query) -> dict[str, Any]: ...

    def next_position(self) -> int: ...


def check_flow(teacher_concurrency: int, batch: int, shared_pool: bool = False) -> None:
    """Validate the two knobs (the command line's ``--teacher-concurrency`` and ``--batch``).
    ``shared_pool``: the run's pool is a PostgreSQL pool, whose claims (taken when a call starts)
    run on the pool's one work connection: no calls in flight there yet."""
    if not isinstance(teacher_concurrency, int) or teacher_concurrency < 1:
        raise ICDError(f"--teacher-concurrency must be a whole number >= 1, got {teacher_concurrency!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ICDError(f"--batch must be a whole number >= 1, got {batch!r}")
    if shared_pool and teacher_concurrency > 1:
        raise ICDError(
            f"--teacher-concurrency {teacher_concurrency} with a shared --pool postgresql://... is not "
            "supported yet (the pool's claims run on one connection); use --teacher-concurrency 1 there, "
            "or more workers (--shard)"
        )


def read_ahead(distiller: Loop, queries: list[Query]) -> None:
    """A micro-batch's student passes read together before its queries are answered one at a time
    (``Distiller.read_ahead``, when the loop has it)."""
    ahead = getattr(distiller, "read_ahead", None)
    if ahead is not None and len(queries) > 1:
        ahead(queries)


@dataclass
class _Slot:
    """One stream position: its record once finished; its draft and call while the call is in flight."""

    position: int
    rec: dict[str, Any] | None = None
    draft: Any | None = None
    future: cf.Future[Annotation] | None = None
    done: bool = False
    refused: bool = False  # the server refused its call for good
    key: tuple[str, str] | None = None  # (image digest, prompt) of its call


class _Failures:
    """Teacher failures in a row, in position order (``LoopConfig.max_teacher_failures``), and a first
    call the server refused for good (a wrong URL, model or key: every call would fail the same way)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.answers = 0

    def check(self, rec: dict[str, Any], refused: bool = False) -> None:
        if rec.get("event") != "query":
            return
        if rec["teacher_asked"]:
            self.count = self.count + 1 if rec["teacher_error"] else 0
            self.answers += int(not rec["teacher_error"])
            if rec["teacher_error"] and refused and not self.answers:
                raise TeacherUnavailable(
                    f"stopped at the first teacher call, which the server refused ({rec['teacher_error']}); "
                    "retrying cannot help: fix the teacher, then continue with --resume"
                )
        if self.limit and self.count >= self.limit:
            raise TeacherUnavailable(
                f"stopped: the teacher failed {self.count} times in a row (last: {rec['teacher_error']}); "
                f"the run is saved, fix the teacher and continue it with --resume"
            )


def _bad_input(item: DataError, next_position: int) -> dict[str, Any]:
    return {"event": "bad_input", "position": getattr(item, "position", next_position), "error": str(item)}


def _chunks(items: Iterable[Query | DataError], size: int) -> Iterator[list[Query | DataError]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def write_record(distiller: Loop, rec: dict[str, Any]) -> None:
    """Append a finished record to the distiller's records and its log."""
    distiller.records.append(rec)
    if distiller.log is not None:
        distiller.log.append(rec)


def finish_call(
    distiller: Loop, draft: Any, future: cf.Future[Annotation], rerun: bool = True
) -> tuple[dict[str, Any], bool]:
    """Steps 4-6 for a query whose teacher call ran on the thread pool: the record ``annotate_later``
    writes when it asks the teacher itself (a call not made is no call; a failure's seconds and faults
    count), and whether the server refused the call for good."""
    try:
        annotation = future.result()
    except TeacherError as e:
        if getattr(e, "not_called", False):
            return distiller.annotate_later(draft, not_called=str(e), rerun=rerun), False
        rec = distiller.annotate_later(draft, teacher_error=str(e), rerun=rerun)
        rec["teacher_error_faults"] = int(getattr(e, "faults", 1))
        rec["seconds"]["teacher"] += float(getattr(e, "seconds", 0.0))
        return rec, isinstance(e, TeacherRefused)  # HTTP 401/403/404: retrying cannot help
    return distiller.annotate_later(draft, annotation, rerun=rerun), False


def run_stream(
    distiller: Loop,
    queries: Iterable[Query | DataError],
    on_record: Callable[[dict[str, Any]], None] | None = None,
    teacher_concurrency: int = 1,
    batch: int = 1,
    window: int = DEFAULT_WINDOW,
) -> list[dict[str, Any]]:
    """Process a stream (see the module's doc). A ``DataError`` item is logged and skipped. Raises
    ``TeacherUnavailable`` after ``max_teacher_failures`` failed calls in a row (in position order);
    that query and any later one are not logged, and calls still in flight are waited for and
    committed to the pool first, so a resumed run asks again only what was never bought."""
    check_flow(teacher_concurrency, batch)
    failures = _Failures(distiller.config.max_teacher_failures)
    if teacher_concurrency == 1:
        _run_serial(distiller, queries, on_record, batch, failures)
        return distiller.records
    with cf.ThreadPoolExecutor(teacher_concurrency, thread_name_prefix="icd-teacher") as pool:
        _Concurrent(distiller, pool, teacher_concurrency, batch, max(window, batch), on_record, failures).run(
            queries
        )
    return distiller.records


def _run_serial(
    distiller: Loop,
    queries: Iterable[Query | DataError],
    on_record: Callable[[dict[str, Any]], None] | None,
    batch: int,
    failures: _Failures,
) -> None:
    for chunk in _chunks(queries, batch):
        read_ahead(distiller, [q for q in chunk if not isinstance(q, DataError)])
        for i, item in enumerate(chunk):
            if isinstance(item, DataError):
                rec = _bad_input(item, distiller.next_position())
            else:
                rec = distiller.step(item)  # the loop as it always was
                if rec.get("teacher_asked") and i + 1 < len(chunk):
                    # the pool changed: the rest of the batch is read ahead again, with its new demos
                    read_ahead(distiller, [q for q in chunk[i + 1 :] if not isinstance(q, DataError)])
            failures.check(rec, bool(getattr(distiller, "last_teacher_refused", False)))
            write_record(distiller, rec)
            if on_record is not None:
                on_record(rec)


class _Concurrent:
    """The driver with calls in flight (``teacher_concurrency > 1``)."""

    def __init__(
        self,
        distiller: Loop,
        pool: cf.ThreadPoolExecutor,
        limit: int,
        batch: int,
        window: int,
        on_record: Callable[[dict[str, Any]], None] | None,
        failures: _Failures,
    ) -> None:
        self.d = distiller
        self.pool = pool
        self.limit = limit
        self.batch = batch
        self.window = window
        self.on_record = on_record
        self.failures = failures
        self.slots: deque[_Slot] = deque()  # unwritten positions, in order
        self.in_flight: dict[cf.Future[Annotation], _Slot] = {}

    def run(self, queries: Iterable[Query | DataError]) -> None:
        try:
            for chunk in _chunks(queries, self.batch):
                self._take(chunk)
                self._collect(block=False)
                self._flush()
            while self.in_flight:
                self._collect(block=True)
                self._flush()
            self._flush()
        except BaseException:
            self._commit_in_flight()
            raise

    def _take(self, chunk: list[Query | DataError]) -> None:
        read_ahead(self.d, [q for q in chunk if not isinstance(q, DataError)])
        for item in chunk:
            if isinstance(item, DataError):
                pos = getattr(item, "position", self._next_position())
                self.slots.append(_Slot(pos, rec=_bad_input(item, pos), done=True))
                continue
            draft = self.d.answer_now(item)
            slot = _Slot(item.position, draft=draft)
            self.slots.append(slot)
            if draft.asked and draft.stored is None:
                twin = self._wait_for_twin(slot)
                if twin is not None:  # bought by the call this query waited on: no call of its own
                    slot.rec, slot.done = self.d.annotate_later(draft, not_called=twin), True
                    continue
                while len(self.in_flight) >= self.limit:
                    self._collect(block=True)
                slot.future = self.pool.submit(self.d.ask_teacher, draft)
                self.in_flight[slot.future] = slot
            else:  # no call (or an annotation recovered from the pool): finished now
                slot.rec, slot.done = self.d.annotate_later(draft), True
            while len(self.slots) > self.window and self.in_flight:
                self._wait_oldest()

    def _wait_for_twin(self, slot: _Slot) -> str | None:
        """A call in flight for the same image and prompt (an item repeated in the stream) is waited
        for first: the loop with ``C=1`` would have pooled its demo before this query came. When that
        demo is pooled, why this query makes no call of its own (else None)."""
        query = slot.draft.query  # type: ignore[union-attr]
        if query.image is None:
            return None
        slot.key = (image_digest(query.image), query.prompt)
        same = [f for f, s in self.in_flight.items() if s.key == slot.key]
        if not same:
            return None
        cf.wait(same)
        self._collect(block=False)
        demo = getattr(self.d.pool, "demo_like", lambda q: None)(query)
        return f"same image and prompt as demo {demo.id}, bought by a call in flight" if demo else None

    def _next_position(self) -> int:
        if self.slots:
            return self.slots[-1].position + 1
        return self.d.next_position()

    def _collect(self, block: bool) -> None:
        """Finish the calls that have returned (with ``block``: wait for at least one)."""
        if not self.in_flight:
            return
        done, _ = cf.wait(list(self.in_flight), timeout=None if block else 0, return_when=cf.FIRST_COMPLETED)
        for fut in sorted(done, key=lambda f: self.in_flight[f].position):
            self._finish(fut)

    def _wait_oldest(self) -> None:
        oldest = next(s for s in self.slots if s.future is not None and not s.done)
        cf.wait([oldest.future])  # type: ignore[list-item]
        self._collect(block=False)
        self._flush()

    def _finish(self, fut: cf.Future[Annotation]) -> None:
        slot = self.in_flight.pop(fut)
        assert slot.draft is not None
        (slot.rec, slot.refused), slot.done = finish_call(self.d, slot.draft, fut), True

    def _flush(self) -> None:
        """Write the finished records at the head of the stream, in position order."""
        while self.slots and self.slots[0].done:
            slot = self.slots[0]
            assert slot.rec is not None
            self.failures.check(slot.rec, slot.refused)  # raises before the record is written
            self.slots.popleft()
            if self.in_flight and slot.rec.get("event") == "query":
                slot.rec["in_flight"] = len(self.in_flight)
            write_record(self.d, slot.rec)
            if self.on_record is not None:
                self.on_record(slot.rec)

    def _commit_in_flight(self) -> None:
        """On the way out (a stop, an error, Ctrl-C): wait for the calls in flight and commit what they
        bought to the pool (not logged: the resumed run recovers it with ``annotation_for``)."""
        for fut, slot in sorted(self.in_flight.items(), key=lambda fs: fs[1].position):
            try:
                finish_call(self.d, slot.draft, fut, rerun=False)  # type: ignore[arg-type]
            except BaseException:  # noqa: BLE001 - best effort; the first error is the one raised
                continue
        self.in_flight.clear()
