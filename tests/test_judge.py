"""The engine's judge: the student's ICL reading, its zero-shot reading and the pool's vote, weighed by
what the teacher's answers showed of each, for any student (fakes here; real backends in
tests/models and tests/test_judge_backends.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fakes import (
    ColourStudent,
    CopyingColourStudent,
    FakeEmbedder,
    FakeStudent,
    FakeTeacher,
    PositionsGate,
    colour_folder,
)
from icdistill.data.stream import load_dataset, stream_order
from icdistill.distiller import Distiller, LoopConfig
from icdistill.judge import Judge, JudgeConfig
from icdistill.models.readahead import ReadAhead
from icdistill.pool import SQLitePool
from icdistill.runlog import RunLog
from icdistill.runner import query_stream
from icdistill.select import make_selector
from icdistill.teacher import TestTimeScaling
from icdistill.types import Annotation, Demo, Prediction, Query


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = colour_folder(tmp_path_factory.mktemp("colours"), n_per_class=10, seed=3)
    ds = load_dataset(str(root))
    order = stream_order(len(ds), None, seed=1)
    queries = [q for q in query_stream(ds, order) if isinstance(q, Query)]
    # the teacher answers the first 4 red and the first 4 green queries only: blue and yellow are
    # never pooled, as a class the gate has not reached yet
    taught = {
        p for label in ("red", "green") for p in sorted(q.position for q in queries if q.label == label)[:4]
    }
    return queries, taught


def _distiller(taught, student, judge: str = "on", pool=None, log=None, judged=None) -> Distiller:
    return Distiller(
        student=student,
        annotator=TestTimeScaling(FakeTeacher()),
        embedder=FakeEmbedder(),
        selector=make_selector("image"),
        gate=PositionsGate(taught),
        pool=pool if pool is not None else SQLitePool(None),
        config=LoopConfig(shots=2, judge=judge),
        log=log,
        judge=judged,
    )


def _run(queries, taught, student, judge: str):
    return _distiller(taught, student, judge).run(queries)


def _accuracy(records, labels=None, key="first_answer", shown=False):
    rs = [r for r in records if (labels is None or r["label"] in labels) and (r["demo_ids"] or not shown)]
    return sum(r[key] == r["label"] for r in rs) / len(rs)


def test_the_judge_keeps_what_a_copying_student_reads_right_alone_where_the_pool_lacks_the_class(colours):
    queries, taught = colours
    plain = _run(queries, taught, CopyingColourStudent(), judge="off")
    judged = _run(queries, taught, CopyingColourStudent(), judge="on")
    alone = [ColourStudent().predict(q, []).answer == q.label for q in queries]
    # plain ICL copies a red or green demo for every blue query shown demos
    assert _accuracy(plain, {"blue"}, shown=True) == 0.0
    # the judge learned from the taught queries that a far demo's answer is wrong and keeps the
    # student's own reading there
    assert _accuracy(judged, {"blue"}, shown=True) == 1.0
    # never below the student alone on the classes the checks speak of. Yellow is nearer red (cosine
    # 0.83) than any check: the judge has no evidence there and its weights stay even (two experts
    # say red); only a teacher call on a yellow query (a check there) can tell it
    # (on the queries the teacher was not asked about: the first green one, taught, met no check yet)
    for label in ("red", "green", "blue"):
        idx = [i for i, q in enumerate(queries) if q.label == label and not judged[i]["teacher_asked"]]
        assert _accuracy([judged[i] for i in idx]) >= np.mean([alone[i] for i in idx]), label
    first = next(r for r in judged if r["label"] == "blue" and r["demo_ids"])
    j = first["student_details"]["judge"]
    assert (
        j["by"] == "judge"
        and j["zero_shot_answer"] == "blue"
        and j.get("icl_answer") in (None, "red", "green")
    )
    assert j["weights"][1] > j["weights"][0] and j["weights"][1] > j["weights"][2]


def test_skipping_the_zero_shot_reading_never_changes_an_answer_and_saves_reads(colours):
    queries, taught = colours
    skipping, full = CopyingColourStudent(), CopyingColourStudent()
    a = _run(queries, taught, skipping, judge="on")
    b = _run(queries, taught, full, judge="full")
    assert [r["answer"] for r in a] == [r["answer"] for r in b]
    assert [r["first_answer"] for r in a] == [r["first_answer"] for r in b]
    # the second LM reading is read where it could change the answer, and for every taught query
    assert sum(skipping.calls.values()) < sum(full.calls.values())
    judged = [r["student_details"]["judge"] for r in a if r["student_details"]["judge"].get("by") == "judge"]
    assert any(j["zero_shot"] is None or j["icl"] is None for j in judged)


def test_a_resumed_run_answers_as_the_uninterrupted_one(colours, tmp_path):
    queries, taught = colours
    whole = _run(queries, taught, CopyingColourStudent(), judge="on")

    with SQLitePool(tmp_path / "pool.sqlite") as pool, RunLog(tmp_path / "log.jsonl") as log:
        _distiller(taught, CopyingColourStudent(), pool=pool, log=log).run(
            queries[:17]
        )  # then the process dies
    student = CopyingColourStudent()
    with SQLitePool(tmp_path / "pool.sqlite") as pool, RunLog(tmp_path / "log.jsonl") as log:
        d = _distiller(taught, student, pool=pool, log=log)
        assert d.judge is not None and d.judge.checks.taught()  # the taught checks came back from the log
        resumed = d.run(queries[17:])
    assert [r["option_probs"] for r in resumed] == [r["option_probs"] for r in whole]
    assert [r["answer"] for r in resumed] == [r["answer"] for r in whole]

    def judged(records):  # what the judge read and weighed, without its timings
        return [{k: v for k, v in r["student_details"]["judge"].items() if k != "seconds"} for r in records]

    assert judged(resumed) == judged(whole)


def test_a_same_image_demo_answers_its_own_question_only(colours):
    queries, taught = colours
    recs = _run(queries, taught, CopyingColourStudent(), judge="on")
    rerun = [r for r in recs if r["teacher_asked"]]
    assert rerun and all(r["answer"] == r["label"] for r in rerun)  # the re-run sees its own demo
    student = FakeStudent()
    judge = Judge(student, 2)
    open_q = Query(id="o", image=queries[0].image, prompt="What is it?")
    assert judge.answer(open_q, FakeEmbedder().embed_query(open_q), [], SQLitePool(None)).answer == "yes"
    # a pooled answer to one question about an image is not the answer to another question about it
    pool, embedder = SQLitePool(None), FakeEmbedder()
    bus = Query(id="a", image=queries[0].image, prompt="What colour is the bus?")
    demo, _ = pool.add(bus, Annotation("red", ["red"], {"red": 1}, 1.0, True, "t"), embedder.embed_query(bus))
    assert demo is not None
    other = Query(id="b", image=queries[0].image.copy(), prompt="How many people are there?")
    again = Query(id="c", image=queries[0].image.copy(), prompt="What colour is the bus?")
    got = {q.id: judge.answer(q, embedder.embed_query(q), [demo], pool) for q in (other, again)}
    assert got["b"].answer == "yes" and got["b"].details["judge"]["by"] == "judge-open"
    assert got["c"].answer == "red" and got["c"].details["judge"]["by"] == "same-image"


def test_the_bayes_rule_also_keeps_the_student_s_reading_where_the_pool_lacks_the_class(colours):
    queries, taught = colours
    student = CopyingColourStudent()
    recs = _distiller(taught, student, judged=Judge(student, 2, JudgeConfig(rule="bayes"))).run(queries)
    assert _accuracy(recs, {"blue"}, shown=True) == 1.0
    j = next(r for r in recs if r["label"] == "blue" and r["demo_ids"])["student_details"]["judge"]
    assert j["rule"] == "bayes" and j["weights"][1] > j["weights"][0]  # the zero-shot answer's reliability


def test_weights_are_even_before_any_check_and_bad_config_is_refused():
    judge = Judge(FakeStudent(), 2)
    w, t_icl, t_zs = judge.checks.weights(("a", "b"), 0.5)
    assert w == pytest.approx([1 / 3] * 3) and t_icl == t_zs == 1.0
    with pytest.raises(Exception, match="judge"):
        JudgeConfig(bandwidth=0)
    with pytest.raises(Exception, match="rule"):
        JudgeConfig(rule="vibes")


def test_the_summary_reports_each_expert_and_the_envelope(colours):
    from icdistill.run_metrics import judge_summary

    queries, taught = colours
    full = judge_summary(_run(queries, taught, CopyingColourStudent(), judge="full"))
    assert full is not None and full["all_read"] == full["judged_queries"] > 0
    icl, zs, vote = (full["experts"][k] for k in ("icl", "zero-shot", "vote"))
    assert icl["read"] == zs["read"] == vote["read"] == full["judged_queries"]
    # the student alone knows every colour here; its copies of demos do not
    assert zs["first_pass_accuracy"] == 1.0 and icl["first_pass_accuracy"] < 1.0
    assert full["envelope"] == 1.0 and full["first_pass_accuracy_all_read"] <= full["envelope"]
    assert full["icl_copies_nearest_demo"] == 1.0
    on = judge_summary(_run(queries, taught, CopyingColourStudent(), judge="on"))
    assert on is not None
    assert min(on["experts"]["zero-shot"]["read"], on["experts"]["icl"]["read"]) < on["judged_queries"]
    assert judge_summary(_run(queries, taught, CopyingColourStudent(), judge="off")) is None


def test_icd_serve_passes_its_judge_setting_to_the_loop():
    from icdistill.service.config import ServeConfig

    assert ServeConfig(no_auth=True).run_config().loop_config().judge == "on"
    assert ServeConfig(no_auth=True, judge="off").run_config().loop_config().judge == "off"
    with pytest.raises(Exception, match="judge"):
        ServeConfig(no_auth=True, judge="maybe").run_config()


class BatchingCopyingStudent(CopyingColourStudent):
    """``CopyingColourStudent`` that reads micro-batches ahead (``prefetch``, kept in a ``ReadAhead``),
    recording each batch and how many predictions were read ahead or afresh."""

    def __init__(self) -> None:
        super().__init__()
        self.ahead = ReadAhead()
        self.batches: list[int] = []
        self.fresh = 0

    def prefetch(self, queries, demos_lists):
        self.batches.append(len(queries))
        preds = [
            super(BatchingCopyingStudent, self).predict(q, d)
            for q, d in zip(queries, demos_lists, strict=True)
        ]
        for p in preds:
            p.seconds = 0.25  # each reading's share of the batch's time
        self.ahead.keep(queries, demos_lists, preds)

    def predict(self, query, demos):
        got = self.ahead.take(query, demos)
        if got is None:
            self.fresh += 1
            return super().predict(query, demos)
        return got


@pytest.mark.parametrize("questions", ["options", "open"])
def test_a_micro_batch_reads_ahead_and_answers_exactly_as_one_query_at_a_time(colours, questions):
    queries, taught = colours
    if questions == "open":
        queries = [replace(q, options=None, prompt="Which colour is this?") for q in queries]
    runs = {}
    for b in (1, 4):
        student = BatchingCopyingStudent()
        runs[b] = (student, _distiller(taught, student).run(queries, batch=b))
    (s1, one), (s4, four) = runs[1], runs[4]

    def same(records):  # everything but the timings
        out = []
        for r in records:
            details = dict(r["student_details"] or {})
            judge = {k: v for k, v in (details.pop("judge", None) or {}).items() if k != "seconds"}
            out.append((r["answer"], r["first_answer"], r.get("option_probs"), r["demo_ids"], judge, details))
        return out

    # teacher calls inside a batch change the later queries' demos: they are read afresh, so every
    # answer, reading and weight is the one a batch of one gives
    assert same(four) == same(one)
    assert s1.batches == []
    # with options the judge's zero-shot readings are read ahead too (an open one only where chosen)
    assert max(s4.batches) > 4 if questions == "options" else max(s4.batches) == 4
    assert s4.fresh < s1.fresh - len(queries) / 2  # most ICL readings were read ahead
    # a reading read ahead counts in the query that uses it, with its share of the batch's time
    assert any(r["seconds"]["student"] >= 0.25 for r in four)
    assert all(r["seconds"]["student"] < 0.25 for r in one)


def test_open_questions_get_the_answer_of_the_expert_most_often_right_near_their_similarity(
    colours, tmp_path
):
    queries, taught = colours
    open_qs = [replace(q, options=None, prompt="Which colour is this?") for q in queries]
    plain = _run(open_qs, taught, CopyingColourStudent(), judge="off")
    student = CopyingColourStudent()
    judged = _run(open_qs, taught, student, judge="on")
    # plain ICL says a red or green demo's answer for every blue query shown demos
    assert _accuracy(plain, {"blue"}, shown=True) == 0.0
    # the taught queries showed that far from the pool only the student's own answer is right
    assert _accuracy(judged, {"blue"}, shown=True) == 1.0
    blue = [r["student_details"]["judge"] for r in judged if r["label"] == "blue" and r["demo_ids"]]
    assert all(j["by"] == "judge-open" and j["chosen"] == "zero-shot" for j in blue)
    assert all(j["icl_answer"] in ("red", "green") and j["zero_shot_answer"] == "blue" for j in blue)
    # near a pooled demo of the query's class the ICL reading (right there) keeps answering, and no
    # zero-shot reading is read for it
    near = [r["student_details"]["judge"] for r in judged if r["label"] in ("red", "green") and r["demo_ids"]]
    assert any(j.get("chosen") == "icl" and "zero_shot_answer" not in j for j in near)
    assert _accuracy(judged, {"red", "green"}) >= _accuracy(plain, {"red", "green"})
    # reading every zero-shot answer (--judge full) changes no answer, nor the uncertainty the gate sees
    full = _run(open_qs, taught, CopyingColourStudent(), judge="full")
    assert [(r["answer"], r["uncertainty"]) for r in full] == [
        (r["answer"], r["uncertainty"]) for r in judged
    ]
    # before any check the student answers as it always did
    first = next(r for r in judged if r["demo_ids"])
    assert first["student_details"]["judge"]["chosen"] == "icl"
    # summary.json and report.md say what each expert got right and how often each was chosen
    from icdistill.eval.judge_report import judge_section
    from icdistill.run_metrics import judge_summary

    summary = judge_summary(judged)
    assert summary is not None and "experts" not in summary
    o = summary["open"]
    assert o["chosen"]["zero-shot"] > 0 and o["chosen"]["icl"] > 0
    assert o["experts"]["zero-shot"]["first_pass_accuracy"] == 1.0
    assert o["experts"]["vote"]["read"] == o["judged_queries"]
    lines = judge_section([{"method": "icd", "budget": 0.05, "seed": 0, "judge": summary}])
    assert any("open questions" in x for x in lines) and any(x.startswith("| icd") for x in lines)

    # a resume answers as the uninterrupted run: the checks and zero-shot answers come back from the log
    with SQLitePool(tmp_path / "pool.sqlite") as pool, RunLog(tmp_path / "log.jsonl") as log:
        _distiller(taught, CopyingColourStudent(), pool=pool, log=log).run(open_qs[:17])
    resumed_student = CopyingColourStudent()
    with SQLitePool(tmp_path / "pool.sqlite") as pool, RunLog(tmp_path / "log.jsonl") as log:
        resumed = _distiller(taught, resumed_student, pool=pool, log=log).run(open_qs[17:])
    assert len(resumed) == len(judged)  # the records before the crash come back from the log
    assert [r["answer"] for r in resumed] == [r["answer"] for r in judged]

    def untimed(records):
        return [
            {k: v for k, v in ((r["student_details"] or {}).get("judge") or {}).items() if k != "seconds"}
            for r in records
        ]

    assert untimed(resumed) == untimed(judged)
    assert resumed_student.calls["zero-shot"] < student.calls["zero-shot"]  # the logged ones are not re-read


def test_the_open_mixture_weighs_each_expert_by_its_checks_near_the_similarity():
    from icdistill.judge_open import OpenChecks

    checks = OpenChecks(JudgeConfig(bandwidth=0.1))
    assert np.allclose(checks.weights(0.5), 1 / 3) and checks.vote_reliability(0.5) == 1.0  # no check
    for _ in range(4):  # far from the pool the vote was wrong and the zero-shot answer right
        checks.add(0.3, [0.2, 0.9, 0.0], False)
    w_far, w_near = checks.weights(0.3), checks.weights(0.9)
    assert w_far[2] < 0.2 and w_far[1] > 0.6
    assert abs(w_near[2] - 1 / 3) < 0.01  # no check near 0.9: even
    # the vote's confidence: low where its far demos were wrong, trusted where nothing was checked
    assert checks.vote_reliability(0.3) < 0.25 and checks.vote_reliability(0.9) > 0.99
    checks.add(0.9, [0.1, None, 1.0], True)  # an expert not read is left out of its check
    w = checks.weights(0.9)
    assert w[2] > w_near[2] > w[0] and w[1] == pytest.approx(1 / 3, abs=0.02)
    assert checks.vote_reliability(0.9) > 0.99


def test_a_sharp_vote_of_near_demos_outweighs_a_hesitant_generation_that_does_not_copy_them():
    from icdistill.judge_open import OpenJudge

    reads = []

    def read(query, demos):  # with demos or without, a hesitant answer that is not a demo's
        reads.append(len(demos))
        answer = "a mosque" if demos else "a tower"
        return Prediction(answer, token_logprobs=[-1.5, -1.2], token_entropies=[2.0, 2.0])

    events = []
    judge = OpenJudge(read, JudgeConfig(), 2, events.append)
    q = Query(id="q", image=None, prompt="Name the main thing.", options=None)
    demos = [Demo(1, "d1", None, q.prompt, "Rocket."), Demo(2, "d2", None, q.prompt, "cat")]
    icl = read(q, demos)
    near = judge.answer(q, icl, (demos, np.array([0.88, 0.21])))
    j = near.details["judge"]
    assert near.answer == "Rocket." and j["chosen"] == "vote" and j["vote_answer"] == "Rocket."
    # at even weights the zero-shot answer could still tie the vote: it is read
    assert reads == [2, 0] and j["zero_shot_answer"] == "a tower"
    # where the checks found it wrong and the vote right, it cannot change the answer: not read
    for _ in range(4):
        judge.checks.add(0.9, [0.3, 0.05, 1.0], True)
    reads.clear()
    again = judge.answer(q, icl, (demos, np.array([0.88, 0.21])))
    assert again.answer == "Rocket." and reads == [] and "zero_shot_answer" not in again.details["judge"]
    # two demos as near as each other split the vote: the zero-shot answer could decide, so it is read
    split = judge.answer(q, icl, (demos, np.array([0.30, 0.30])))
    assert reads == [0] and "zero_shot_answer" in split.details["judge"]
    # the teacher's answer checks each expert at the similarity met: p(answer) per expert
    judge.teach(q, {}, again, "rocket", None, True)
    # an earlier version's checks replay: right / wrong per expert, and p without the vote's verdict
    judge.apply(["open-teach", 0.4, [False, True, None]])
    judge.apply(["open-check", 0.5, [0.1, None, 0.6]])
    assert judge.checks.p[-2:] == [
        [0.0, 1.0, pytest.approx(np.nan, nan_ok=True)],
        [0.1, pytest.approx(np.nan, nan_ok=True), 0.6],
    ]
    assert judge.checks.vote_right[-1] == 1.0 and np.isnan(judge.checks.vote_right[-2])
    kind, sim, p, vote_right = events[-1]
    # the vote's p is its confidence there (the checks near 0.9) times its softmax share
    assert kind == "open-check" and sim == 0.88 and vote_right and p[2] > 0.7
    assert p[0] == 0.0 and p[1] == 0.0  # neither generation said it


@pytest.mark.parametrize("with_vote", [True, False])
def test_a_skipped_reading_could_never_have_changed_the_answer(with_vote):
    """The skip rule against what the reading could have said: where it skips, no distribution in the
    reading's place (random ones and the one-hots) changes the answer, the likelihood ratio applied;
    without a vote the mixture renormalises over the two LM readings (a text-only option question)."""
    from icdistill.judge import ICL, VOTE, ZERO_SHOT

    judge = Judge(student=None, shots=2)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    skipped = 0
    for _ in range(400):
        k = int(rng.integers(2, 7))
        options = tuple(f"o{i}" for i in range(k))
        w = rng.dirichlet(np.ones(3))
        ratio = np.exp(rng.normal(0, 1.5, size=k))
        second = ZERO_SHOT if rng.random() < 0.5 else ICL
        first = ICL if second == ZERO_SHOT else ZERO_SHOT
        readings = {
            first: rng.dirichlet(np.full(k, 0.3)),
            second: None,
            VOTE: rng.dirichlet(np.full(k, 0.3)) if with_vote else None,
        }
        if judge._second_needed(options, readings, w, None, second, ratio):
            continue
        skipped += 1
        now = int(np.argmax(judge._combine(options, readings, w, None) * ratio))
        for said in [*rng.dirichlet(np.full(k, 0.2), size=30), *np.eye(k)]:
            full = judge._combine(options, {**readings, second: said}, w, None) * ratio
            assert int(np.argmax(full)) == now
    assert skipped > 50  # the rule does skip
