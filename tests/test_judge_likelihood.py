"""The labels' likelihood ratios (``icdistill.judge_likelihood``): how far a query is from each label's
taught images, as evidence for or against that label, read from the teacher's answers themselves; and
the judge that multiplies its answer by them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from fakes import ColourStudent, FakeEmbedder, FakeTeacher, PositionsGate, colour_folder
from icdistill.data.stream import load_dataset, stream_order
from icdistill.distiller import Distiller, LoopConfig
from icdistill.errors import ICDError
from icdistill.judge import Judge, JudgeConfig
from icdistill.judge_likelihood import SimilarityLikelihood
from icdistill.pool import SQLitePool
from icdistill.runner import query_stream
from icdistill.select import make_selector
from icdistill.teacher import TestTimeScaling
from icdistill.types import Demo, Prediction, Query

OPTIONS = ("a", "b", "c")


def _cluster(rng: np.random.Generator, centre: np.ndarray, n: int, spread: float) -> np.ndarray:
    x = centre[None, :] + spread * rng.normal(size=(n, centre.size))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _axes(d: int = 32) -> np.ndarray:
    return np.eye(d)


def test_apart_classes_make_a_near_label_likely_and_a_far_one_unlikely():
    rng = np.random.default_rng(0)
    e = _axes()
    lik = SimilarityLikelihood()
    for x in _cluster(rng, e[0], 20, 0.1):
        lik.teach(x, "a")
    for x in _cluster(rng, e[1], 20, 0.1):
        lik.teach(x, "b")
    near_a = lik.ratios(OPTIONS, _cluster(rng, e[0], 1, 0.1)[0])
    assert near_a[0] > 3.0 and near_a[1] < 0.5
    assert near_a[2] == 1.0  # never answered: nothing is known of its images
    # far from every taught image: both taught labels are unlikely, the untaught one keeps 1
    far = lik.ratios(OPTIONS, e[5])
    assert far[0] < 0.5 and far[1] < 0.5 and far[2] == 1.0


def test_one_label_pooled_alone_is_unlikely_for_a_far_query_and_stays_likely_for_a_near_one():
    """The photos' case: the only pooled class is at cosine 0.2; its images sit at 0.9 from each other."""
    rng = np.random.default_rng(1)
    e = _axes()
    lik = SimilarityLikelihood()
    for x in _cluster(rng, e[0], 90, 0.1):
        lik.teach(x, "a")
    far = 0.2 * e[0] + np.sqrt(1 - 0.04) * e[3]
    # no other label: the only evidence is how far the query is from where "a"'s images are; it
    # weighs as much as the images against the uniform's 30 pseudo-images (a quarter here)
    assert lik.ratios(OPTIONS, far)[0] < 0.3
    assert lik.ratios(OPTIONS, _cluster(rng, e[0], 1, 0.1)[0])[0] > 1.0


def test_overlapping_classes_leave_the_ratios_near_one():
    """Labels that do not follow the images (Fashion-MNIST in an ImageNet CNN's space, at worst): the
    same-label and other-label cosines have one density, and no label is pushed far either way."""
    rng = np.random.default_rng(2)
    centre = _axes()[0]
    lik = SimilarityLikelihood()
    for i, x in enumerate(_cluster(rng, centre, 60, 0.3)):
        lik.teach(x, OPTIONS[i % 3])
    ratios = np.array([lik.ratios(OPTIONS, q) for q in _cluster(rng, centre, 20, 0.3)])
    assert np.all((ratios > 0.5) & (ratios < 2.0))


def test_nothing_known_gives_one_and_answers_outside_the_options_are_ignored():
    lik = SimilarityLikelihood()
    assert list(lik.ratios(OPTIONS, np.ones(4))) == [1.0, 1.0, 1.0]
    lik.teach(np.ones(4), "z")  # not an option: not remembered
    assert lik.taught(OPTIONS) == 0
    lik.teach(np.ones(4), "a")
    assert list(lik.ratios(OPTIONS, np.ones(4))) == [1.0, 1.0, 1.0]  # one image: no cosine between two
    with pytest.raises(ICDError):
        SimilarityLikelihood(bandwidth=0)
    with pytest.raises(ICDError):
        JudgeConfig(likelihood_bandwidth=0)
    with pytest.raises(ICDError):
        JudgeConfig(likelihood_prior=0)


def _brute_best(features: np.ndarray, labels: Sequence[int], k: int) -> np.ndarray:
    sims = features @ features.T
    np.fill_diagonal(sims, -np.inf)
    out = np.full((len(labels), k), -np.inf)
    for i in range(len(labels)):
        for j, y in enumerate(labels):
            out[i, y] = max(out[i, y], sims[i, j])
    return out


def test_kept_up_one_answer_at_a_time_as_if_computed_afresh():
    rng = np.random.default_rng(3)
    x = _cluster(rng, _axes(8)[0], 20, 0.5)
    labels = [int(v) for v in rng.integers(0, 3, size=20)]
    lik = SimilarityLikelihood()
    for f, y in zip(x[:10], labels[:10], strict=True):
        lik.teach(f, OPTIONS[y])
    lik.ratios(OPTIONS, x[0])  # looked at half-way: the rest is caught up later
    for f, y in zip(x[10:], labels[10:], strict=True):
        lik.teach(f, OPTIONS[y])
    t = lik._view(lik._names(OPTIONS)[0])
    assert np.allclose(t.best[:20], _brute_best(x.astype(np.float32), labels, 3), atol=1e-5)


def test_what_a_set_of_labels_holds_depends_only_on_the_answers_kept():
    """A resumed run replays the answers and looks at each set of labels later than the live run did:
    after the oldest answers are forgotten (among them answers that name none of the set), both read
    the same ratios, those of a judge taught only the answers kept."""
    rng = np.random.default_rng(6)
    e = _axes()
    a, b = _cluster(rng, e[0], 7, 0.2), _cluster(rng, e[1], 7, 0.2)
    answers = [(a[i], "a") for i in range(5)] + [(b[i], "b") for i in range(5)]
    answers += [(_cluster(rng, e[4], 1, 0.2)[0], "z") for _ in range(15)]  # open answers of no option
    answers += [(a[5], "a"), (b[5], "b"), (a[6], "a"), (b[6], "b")]
    query = 0.6 * e[0] + 0.8 * e[2]
    live, replayed = SimilarityLikelihood(max_taught=20), SimilarityLikelihood(max_taught=20)
    for i, (f, answer) in enumerate(answers):
        live.teach(f, answer)
        replayed.teach(f, answer)
        if i in (9, 12):
            live.ratios(OPTIONS, query)  # the live run asked in between
    kept = SimilarityLikelihood(max_taught=20)
    for f, answer in answers[len(answers) - len(live._answers) :]:
        kept.teach(f, answer)
    assert live._first > 0  # answers were forgotten
    assert np.array_equal(live.ratios(OPTIONS, query), replayed.ratios(OPTIONS, query))
    assert np.array_equal(live.ratios(OPTIONS, query), kept.ratios(OPTIONS, query))
    assert live.taught(OPTIONS) == kept.taught(OPTIONS) < 14
    # the least recently asked set of labels goes, and is the same when rebuilt
    few = SimilarityLikelihood(max_sets=1)
    for f, answer in answers[:10]:
        few.teach(f, answer)
    first = few.ratios(("a", "b"), query)
    few.ratios(("b", "c"), query)
    assert list(few._sets) == [("b", "c")]
    assert np.array_equal(few.ratios(("a", "b"), query), first)


def test_a_query_far_from_every_image_gets_no_evidence_however_many_labels_are_taught():
    """Each image weighs as much in both densities: far from every sample the ratio is 1, not the
    ratio of the sample counts (one same-label sample an image against one per other label)."""
    rng = np.random.default_rng(7)
    e = _axes()
    labels = [f"l{i}" for i in range(10)]
    lik = SimilarityLikelihood()
    for i, label in enumerate(labels):
        for x in _cluster(rng, e[i], 30, 0.05):
            lik.teach(x, label)
    far = -e[0]  # cosine about -1 to every image of l0: below every sample
    assert lik.ratios(labels, far)[0] == pytest.approx(1.0, abs=1e-6)
    # and the labels' own images still tell near from far
    assert lik.ratios(labels, e[0])[0] > 3.0 and lik.ratios(labels, e[0])[1] < 0.5


def test_options_that_share_a_name_get_no_evidence():
    rng = np.random.default_rng(8)
    lik = SimilarityLikelihood()
    for x in _cluster(rng, _axes()[0], 5, 0.1):
        lik.teach(x, "A")
    for x in _cluster(rng, _axes()[1], 5, 0.1):
        lik.teach(x, "b")
    ratios = lik.ratios(("A", "a.", "b"), _axes()[0])
    assert ratios[0] == ratios[1] == 1.0  # which of the two an answer "A" names is unknown
    assert ratios[2] < 1.0


# ---------------------------------------------------------------- in the judge


class HesitantCopyingStudent:
    """Reads a colour right alone but barely (a small margin), and with demos copies the nearest one:
    the student that follows the only pooled class wherever it is shown it."""

    name = "hesitant-copying-student"

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction:
        assert query.options is not None
        if demos:
            scores = dict.fromkeys(query.options, 0.0)
            scores[demos[-1].answer] = 3.0
        else:
            alone = ColourStudent().predict(query, demos).option_scores or {}
            scores = {o: 0.02 * s for o, s in alone.items()}
        return Prediction(max(scores, key=scores.__getitem__), option_scores=scores)


def _run(queries: list[Query], taught: set[int], likelihood: bool) -> list[dict]:
    return Distiller(
        student=HesitantCopyingStudent(),
        annotator=TestTimeScaling(FakeTeacher()),
        embedder=FakeEmbedder(),
        selector=make_selector("image"),
        gate=PositionsGate(taught),
        pool=SQLitePool(None),
        config=LoopConfig(shots=2, judge="on"),
        judge=Judge(HesitantCopyingStudent(), shots=2, config=JudgeConfig(likelihood=likelihood)),
    ).run(queries)


def test_the_judge_does_not_follow_the_only_pooled_class_to_a_query_far_from_all_its_images(tmp_path):
    """Only red is pooled (the teacher answered red queries only): shown red demos, the student copies
    them, the vote says red, and with no check of another label the weights stay even, so the mixture
    answers red for a blue query. Red's images sit at cosine ~0.99 from each other and at ~0.3 from
    a blue query: the ratio makes red unlikely there, and the student's own hesitant reading wins."""
    ds = load_dataset(str(colour_folder(tmp_path / "colours", n_per_class=100, seed=5)))
    queries = [q for q in query_stream(ds, stream_order(len(ds), None, seed=2)) if isinstance(q, Query)]
    red = sorted(q.position for q in queries if q.label == "red")
    taught = set(red[:90])
    late_blue = [i for i, q in enumerate(queries) if q.label == "blue" and q.position > red[89]]
    assert len(late_blue) >= 5
    plain = _run(queries, taught, likelihood=False)
    judged = _run(queries, taught, likelihood=True)
    assert all(plain[i]["first_answer"] == "red" for i in late_blue)
    assert all(judged[i]["first_answer"] == "blue" for i in late_blue)
    details = judged[late_blue[0]]["student_details"]["judge"]
    ratio = dict(zip(queries[late_blue[0]].options or (), details["likelihood"], strict=True))
    assert ratio["red"] < 0.5 and ratio["blue"] == 1.0  # blue was never answered
    # a red query is not pushed off red: its ratio is above 1 and it is answered red
    late_red = [i for i, q in enumerate(queries) if q.label == "red" and q.position > red[89]]
    for i in late_red:
        j = judged[i]["student_details"]["judge"]
        if j.get("by") == "judge":
            options = queries[i].options or ()
            assert j["likelihood"][options.index("red")] > 1.0
        assert judged[i]["first_answer"] == "red"
    # the answer is the mixture times the ratios: the logged probabilities carry them
    probs = judged[late_blue[0]]["option_probs"]
    assert probs["blue"] > probs["red"]


def test_every_answer_that_names_an_option_counts_whatever_its_question():
    """An open answer "Rocket." names the option "rocket"; an answer to one option set names the same
    option of another; letters stay options (the article "a" is not dropped)."""
    rng = np.random.default_rng(4)
    e = _axes()
    lik = SimilarityLikelihood()
    for x in _cluster(rng, e[0], 20, 0.1):
        lik.teach(x, "Rocket.")  # an open question's answer
    for x in _cluster(rng, e[1], 20, 0.1):
        lik.teach(x, "cat")  # an answer to ("cat", "dog")
    lik.teach(e[2], "a rocket launching at night")  # names no option: not a labelled image of one
    assert lik.taught(("rocket", "cat", "mug")) == 40
    assert lik.taught(("cat", "dog")) == 20
    assert lik.taught(("A", "B")) == 0
    lik.teach(e[3], "A")
    lik.teach(e[3], "a")
    assert lik.taught(("A", "B")) == 2
    near_rocket = lik.ratios(("rocket", "cat", "mug"), _cluster(rng, e[0], 1, 0.1)[0])
    assert near_rocket[0] > 3.0 and near_rocket[1] < 0.5 and near_rocket[2] == 1.0
    # an option set first asked after the answers were given sees them all, answers kept in order
    late = SimilarityLikelihood()
    for f, a in [(x, "Rocket.") for x in _cluster(rng, e[0], 3, 0.1)]:
        late.teach(f, a)
    assert late.taught(("rocket",)) == 3
    late.teach(e[0], "rocket")
    assert late.taught(("rocket",)) == 4


def test_the_judge_logs_an_open_answer_s_image_and_a_resumed_judge_counts_it():
    from icdistill.coverage import encode_sketch
    from icdistill.types import IMAGE

    rng = np.random.default_rng(5)
    images = _cluster(rng, _axes()[0], 4, 0.1).astype(np.float32)
    judge = Judge(HesitantCopyingStudent(), shots=2)
    for i, f in enumerate(images):
        judge.teach(
            Query(f"q{i}", None, "What is this?"),
            {IMAGE: f},
            Prediction("rocket", token_logprobs=[-0.1], token_entropies=[0.1]),
            "rocket",
        )
    events = judge.drain_events()
    assert [ev[0] for ev in events] == ["labelled-image"] * 4
    assert judge.likelihood.taught(("rocket", "cat")) == 4
    resumed = Judge(HesitantCopyingStudent(), shots=2)
    resumed.replay({"judge_events": events})
    assert resumed.likelihood.taught(("rocket", "cat")) == 4
    assert events[0][2] == encode_sketch(images[0])
