from dataclasses import replace

import pytest
from PIL import Image

from fakes import FakeEmbedder, FakeStudent, FakeTeacher, colour_folder
from icdistill.data.stream import load_dataset, stream_order
from icdistill.distiller import Distiller, LoopConfig
from icdistill.errors import ICDError, TeacherError
from icdistill.eval.metrics import never_pooled, summarize
from icdistill.gate import AlwaysGate, BudgetGate, NeverGate
from icdistill.pool import SQLitePool
from icdistill.runlog import RunLog
from icdistill.runner import query_stream
from icdistill.select import make_selector
from icdistill.teacher import TestTimeScaling
from icdistill.types import Query


@pytest.fixture()
def dataset(tmp_path):
    return load_dataset(str(colour_folder(tmp_path / "colours", n_per_class=10)))


def make(gate, teacher=None, answer="student", pool=None, log=None, samples=1, agreement=0.0):
    return Distiller(
        student=FakeStudent(),
        annotator=TestTimeScaling(teacher or FakeTeacher(), n=samples, agreement_floor=agreement),
        embedder=FakeEmbedder(),
        selector=make_selector("image"),
        gate=gate,
        pool=pool if pool is not None else SQLitePool(None),
        config=LoopConfig(shots=2, answer=answer),
        log=log,
    )


def stream(ds, n=40, seed=0):
    return query_stream(ds, stream_order(len(ds), n, seed, True))


def test_never_gate_is_zero_shot(dataset):
    d = make(NeverGate())
    recs = d.run(stream(dataset))
    s = summarize(recs)
    assert s["teacher_calls"] == 0 and s["pool_size"] == 0
    assert all(r["demo_ids"] == [] for r in recs)
    assert s["accuracy"] < 0.5  # FakeStudent without demos answers the first option


def test_icd_beats_zero_shot_with_few_calls(dataset):
    d = make(BudgetGate(0.25, warmup=4, min_history=5))
    recs = d.run(stream(dataset))
    s = summarize(recs)
    zero = summarize(make(NeverGate()).run(stream(dataset)))
    assert s["accuracy"] > zero["accuracy"] + 0.3
    assert s["teacher_call_rate"] <= 0.3
    assert s["pool_size"] == s["teacher_calls"]
    assert s["demonstration_accuracy"] is not None and s["demonstration_accuracy"] > 0.5
    asked = [r for r in recs if r["teacher_asked"]]
    assert all(r["annotation"]["answer"] == r["label"] for r in asked)
    assert all(r["answered_by"] == "student+new-demo" for r in asked)
    # the re-run sees the fresh demo of the same image first
    assert all(r["final_demo_ids"] and r["correct"] for r in asked)


def test_forward_policy_returns_teacher_answer(dataset):
    recs = make(AlwaysGate(), answer="forward").run(stream(dataset, n=10))
    assert all(r["answered_by"] == "teacher" and r["correct"] for r in recs)


def test_teacher_failure_is_logged_not_fatal(dataset):
    recs = make(AlwaysGate(), teacher=FakeTeacher(fail=True)).run(stream(dataset, n=5))
    s = summarize(recs)
    assert s["n_queries"] == 5 and s["teacher_failures"] == 5 and s["pool_size"] == 0
    assert all("down" in r["teacher_error"] for r in recs)


def test_rejected_annotations_counted_not_pooled(dataset):
    recs = make(AlwaysGate(), teacher=FakeTeacher(wrong_every=2), samples=2, agreement=0.9).run(
        stream(dataset, n=6)
    )
    s = summarize(recs)
    assert s["rejected_annotations"] == 6 and s["pool_size"] == 0 and s["teacher_calls"] == 6


def test_bad_input_logged_and_skipped(tmp_path):
    root = colour_folder(tmp_path / "c", n_per_class=3)
    (root / "red" / "broken.png").write_bytes(b"not a png")
    ds = load_dataset(str(root))
    recs = make(AlwaysGate()).run(query_stream(ds, stream_order(len(ds), None, 0, True)))
    bad = [r for r in recs if r["event"] == "bad_input"]
    assert len(bad) == 1 and "broken.png" in bad[0]["error"]
    assert summarize(recs)["n_queries"] == len(ds) - 1


def test_resume_replays_gate_and_skips_done(dataset, tmp_path):
    order = stream_order(len(dataset), 30, 0, True)
    pool_path, log_path = tmp_path / "pool.sqlite", tmp_path / "log.jsonl"

    def gate():
        return BudgetGate(0.2, warmup=3, min_history=5)

    # uninterrupted reference run
    ref = make(gate()).run(query_stream(dataset, order))
    # interrupted run: 12 queries, then a "crash"
    with SQLitePool(pool_path) as pool, RunLog(log_path) as log:
        make(gate(), pool=pool, log=log).run(query_stream(dataset, order[:12]))
    with SQLitePool(pool_path) as pool, RunLog(log_path) as log:
        d = make(gate(), pool=pool, log=log)
        assert d.next_position() == 12
        d.run(query_stream(dataset, order, start=d.next_position()))
        recs = d.records
    assert [r["position"] for r in recs] == list(range(30))
    key = ("answer", "teacher_asked", "demo_ids", "pool_size")
    assert [tuple(str(r[k]) for k in key) for r in recs] == [tuple(str(r[k]) for k in key) for r in ref]


def test_resume_after_pool_write_without_log_line(dataset, tmp_path):
    """A crash between the pool commit and the log append: the annotation is reused, not re-bought."""
    order = stream_order(len(dataset), 5, 0, True)
    pool_path = tmp_path / "pool.sqlite"
    teacher = FakeTeacher()
    with SQLitePool(pool_path) as pool:
        make(AlwaysGate(), teacher=teacher, pool=pool).run(query_stream(dataset, order[:3]))  # no log kept
    assert teacher.samples == 3
    with SQLitePool(pool_path) as pool, RunLog(tmp_path / "log.jsonl") as log:
        d = make(NeverGate(), teacher=teacher, pool=pool, log=log)
        recs = d.run(query_stream(dataset, order))
    assert teacher.samples == 3  # nothing bought twice
    assert [r["teacher_asked"] for r in recs] == [True, True, True, False, False]
    assert all("recovered" in r["gate_reason"] for r in recs[:3])
    # a query never sees its own annotation on its first pass
    by_query = {dm.id: dm.query_id for dm in SQLitePool(pool_path).demos()}
    assert all(by_query.get(i) != r["query_id"] for r in recs for i in r["demo_ids"])


def test_a_recovered_query_sees_the_coverage_it_saw_before_the_crash(dataset, tmp_path):
    """A query pooled before a crash but not logged is re-run on resume: its gate signals (nearest
    pooled demo, leaving out its own) must be those of the uninterrupted run, or a coverage gate
    could decide differently after a resume."""
    order = stream_order(len(dataset), 6, 0, True)
    ref = make(AlwaysGate()).run(query_stream(dataset, order))
    pool_path, log_path = tmp_path / "pool.sqlite", tmp_path / "log.jsonl"
    with SQLitePool(pool_path) as pool, RunLog(log_path) as log:
        make(AlwaysGate(), pool=pool, log=log).run(query_stream(dataset, order[:3]))
    with SQLitePool(pool_path) as pool:  # query 3 is pooled, its log line lost in the crash
        make(AlwaysGate(), pool=pool).run(query_stream(dataset, order[:4], start=3))
    with SQLitePool(pool_path) as pool, RunLog(log_path) as log:
        d = make(AlwaysGate(), pool=pool, log=log)
        assert d.next_position() == 3
        recs = d.run(query_stream(dataset, order, start=3))[3:]
    assert [r["position"] for r in recs] == [3, 4, 5]
    assert "recovered" in recs[0]["gate_reason"]
    assert "nearest_demo_similarity" in ref[3]["gate_signals"]
    for r, want in zip(recs, ref[3:], strict=True):
        assert r["gate_signals"] == want["gate_signals"]
        assert r["gate_score"] == want["gate_score"]


def test_loop_config_validation():
    with pytest.raises(ICDError):
        LoopConfig(shots=-1)
    with pytest.raises(ICDError):
        LoopConfig(answer="teacher")  # type: ignore[arg-type]
    with pytest.raises(ICDError):
        LoopConfig(uncertainty="vibes")


def test_demo_order_puts_best_demo_nearest_the_query(dataset):
    def first_pass_demos(order):
        d = Distiller(
            student=FakeStudent(),
            annotator=TestTimeScaling(FakeTeacher()),
            embedder=FakeEmbedder(),
            selector=make_selector("image"),
            gate=AlwaysGate(),
            pool=SQLitePool(None),
            config=LoopConfig(shots=3, demo_order=order),
        )
        return [r["demo_ids"] for r in d.run(stream(dataset, n=12))]

    last, first = first_pass_demos("best-last"), first_pass_demos("best-first")
    assert any(len(x) == 3 for x in last)
    assert all(a == b[::-1] for a, b in zip(last, first, strict=True))


class PricedTeacher(FakeTeacher):
    """A FakeTeacher whose every request costs ``usd``."""

    def __init__(self, usd: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.usd = usd

    def sample(self, query, n):
        resp = super().sample(query, n)
        resp.usage.cost_usd = self.usd
        return resp


def test_recovered_annotation_is_charged_once_and_its_gate_context_is_unchanged(dataset, tmp_path):
    """A $1 cap spent $1.50 on resume vs $1.20 uninterrupted: the recovered call was never charged."""
    from icdistill.gate import CappedGate

    order = stream_order(len(dataset), 8, 0, True)

    def gate():
        return CappedGate(AlwaysGate(), max_cost_usd=1.0)

    ref_teacher = PricedTeacher(0.3)
    ref = make(gate(), teacher=ref_teacher).run(query_stream(dataset, order))
    pool_path, log_path = tmp_path / "pool.sqlite", tmp_path / "log.jsonl"
    teacher = PricedTeacher(0.3)
    with SQLitePool(pool_path) as pool, RunLog(log_path) as log:
        d = make(gate(), teacher=teacher, pool=pool, log=log)
        d.run(query_stream(dataset, order[:1]))
        d.step(next(query_stream(dataset, order, start=1)))  # pool written, then killed before the log line
    with SQLitePool(pool_path) as pool, RunLog(log_path) as log:
        recs = make(gate(), teacher=teacher, pool=pool, log=log).run(query_stream(dataset, order, start=1))
    assert teacher.samples == ref_teacher.samples == 3  # $0.90: a fourth call would pass the $1 cap
    assert [r["teacher_asked"] for r in recs] == [r["teacher_asked"] for r in ref]
    assert [r["ctx_pool_size"] for r in recs] == [r["ctx_pool_size"] for r in ref]


def test_repeated_image_and_prompt_is_not_bought_again(dataset):
    q = next(stream(dataset, n=1))
    twins = [replace(q, id=f"copy{i}", position=i) for i in range(4)]
    teacher = FakeTeacher()
    recs = make(AlwaysGate(), teacher=teacher).run(twins)
    assert teacher.samples == 1
    assert [r["teacher_asked"] for r in recs] == [True, False, False, False]
    assert all("same image and prompt" in r["gate_reason"] for r in recs[1:])
    assert all(r["correct"] for r in recs)


def test_failed_teacher_calls_count_time_and_faults(dataset):
    class Down(FakeTeacher):
        def sample(self, query, n):
            raise TeacherError("openai:x: no answer after 6 attempts: connection refused")

    recs = make(AlwaysGate(), teacher=Down()).run(stream(dataset, n=3))
    s = summarize(recs)
    assert s["teacher_failures"] == 3 and s["teacher_usage"]["faults"] == 18
    assert all(r["seconds"]["teacher"] > 0 for r in recs)


def test_gate_sees_the_uncertainty_kind(tmp_path):
    seen = []

    class Spy(AlwaysGate):
        def observe(self, uncertainty, ctx, asked):
            seen.append(ctx.kind)

    img = Image.new("RGB", (4, 4), (200, 0, 0))
    qs = [
        Query(id="a", image=img, prompt="Which colour?", options=("red", "blue"), label="red", position=0),
        Query(id="b", image=img, prompt="Describe it.", label="a red square", position=1),
    ]
    recs = make(Spy()).run(qs)
    assert seen == ["options", "open"] and [r["ctx_kind"] for r in recs] == seen


def test_the_summary_shows_each_label_and_kind_and_names_labels_the_pool_never_received(dataset, tmp_path):
    """An average can hide a class: the summary reports every label (final, first pass, not asked),
    each question kind, and names the labels the stream keeps meeting that no demo answers."""
    pool = SQLitePool(None)
    reds = [q for q in stream(dataset, n=30) if isinstance(q, Query) and q.label == "red"][:3]
    make(AlwaysGate(), pool=pool).run(reds)  # the pool only learns red
    log = RunLog(tmp_path / "log.jsonl")
    recs = make(NeverGate(), pool=pool, log=log).run(stream(dataset, n=30))
    s = summarize(recs)
    assert set(s["per_label"]) == {r["label"] for r in recs} and len(s["per_label"]) >= 3
    for label, g in s["per_label"].items():
        rows = [r for r in recs if r["label"] == label]
        assert g["n"] == len(rows)
        assert g["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
        assert g["first_pass_accuracy"] == pytest.approx(sum(r["first_correct"] for r in rows) / len(rows))
    assert set(s["per_kind"]) == {"options"} and s["per_kind"]["options"]["n"] == 30
    assert never_pooled(recs, set(pool.answers()), min_queries=5) == {
        k: g["n"] for k, g in s["per_label"].items() if k != "red"
    }
    assert s["first_answer_is_nearest_demo"] is not None  # FakeStudent copies its demos
    # every record says what the gate saw: how near the nearest same-kind demo is, how typical
    # (the three red queries the first run annotated are recovered from the pool, not gated)
    fresh = [r for r in recs if not r["teacher_asked"]]
    assert len(fresh) == 27 and all(r["gate_signals"]["nearest_demo_similarity"] > 0 for r in fresh)
    assert all("typicality" in r["gate_signals"] for r in recs[12:])


class _RefusingTeacher(FakeTeacher):
    """Answers every other request; the others are refused before any call (a shared budget spent)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def sample(self, query, n):
        self.requests += 1
        if self.requests % 2 == 0:
            err = TeacherError("shared budget spent")
            err.not_called = True  # type: ignore[attr-defined]
            raise err
        return super().sample(query, n)


def test_a_refused_call_is_given_back_to_the_gate_as_on_resume(dataset, tmp_path):
    # the gate counts a call in answer_now; a refused one (not made) must be taken back, or the
    # gate's per-kind spend runs ahead of the real one (under-spending) and a resumed run, which
    # replays the logged teacher_asked=False, paces differently
    def gate():
        return BudgetGate(0.3, warmup=3, min_history=5)

    live_gate = gate()
    with SQLitePool(tmp_path / "pool.sqlite") as pool, RunLog(tmp_path / "log.jsonl") as log:
        d = make(live_gate, teacher=_RefusingTeacher(), pool=pool, log=log)
        recs = d.run(stream(dataset, 30))
    real_calls = sum(r["teacher_asked"] for r in recs)
    assert any("not asked: shared budget spent" in r["gate_reason"] for r in recs)
    assert live_gate.counts_["options"].calls == real_calls == d.teacher_calls
    with SQLitePool(tmp_path / "pool.sqlite") as pool, RunLog(tmp_path / "log.jsonl") as log:
        resumed_gate = gate()
        make(resumed_gate, pool=pool, log=log)
    assert resumed_gate.counts_ == live_gate.counts_


def test_a_stream_whose_questions_each_have_their_own_options_leaves_the_warm_up(dataset):
    # multiple-choice questions with per-question options (a manifest, an HF dataset): the pool
    # never holds a demo of the very same option set, so counting only those kept the budget gate
    # in its warm-up for the whole stream, never ranking a query by its score
    labels = sorted({q.label for q in stream(dataset)})
    qs = []
    for i, q in enumerate(stream(dataset, n=60)):
        options = (q.label, *[x for x in labels if x != q.label][:1], f"none of these ({i})")
        qs.append(replace(q, options=options))
    recs = make(BudgetGate(0.2, warmup=3, min_history=5)).run(qs)
    reasons = [r["gate_reason"] for r in recs]
    assert sum(r.startswith("warm-up") for r in reasons) <= 3
    assert any("quantile" in r for r in reasons)


def test_the_judge_checks_the_pool_s_vote_with_the_run_s_number_of_shots():
    # the judge replays a vote of ``shots`` taught neighbours to learn how far to trust the demos;
    # the student's old mixture replayed 2 whatever --shots showed the student
    d = Distiller(
        student=FakeStudent(),
        annotator=TestTimeScaling(FakeTeacher()),
        embedder=FakeEmbedder(),
        selector=make_selector("image"),
        gate=AlwaysGate(),
        pool=SQLitePool(None),
        config=LoopConfig(shots=5),
    )
    assert d.judge is not None and d.judge.shots == 5 and d.judge.checks.shots == 5
    off = Distiller(
        student=FakeStudent(),
        annotator=TestTimeScaling(FakeTeacher()),
        embedder=FakeEmbedder(),
        selector=make_selector("image"),
        gate=AlwaysGate(),
        pool=SQLitePool(None),
        config=LoopConfig(shots=5, judge="off"),
    )
    assert off.judge is None
