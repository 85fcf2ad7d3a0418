import math

import numpy as np
import pytest

from fakes import FakeEmbedder, FakeStudent
from icdistill.conformance import check_student, check_teacher, sample_demos, sample_queries
from icdistill.eval.baselines import AbstainingStudent, KNNStudent, MemoStudent, SelfTeacher
from icdistill.gate import margin
from icdistill.types import IMAGE, Demo, Prediction, Query


class VecEmbedder:
    """Query vectors given by hand."""

    def __init__(self, vec):
        self.vec = np.asarray(vec, dtype=np.float32)

    def embed_query(self, query):
        return {IMAGE: self.vec}

    def embed_texts(self, texts):
        return np.zeros((len(texts), 2), dtype=np.float32)


def _demo(i, answer, vec):
    return Demo(
        id=i, query_id=f"d{i}", image=None, prompt="q", answer=answer, embeddings={IMAGE: np.array(vec)}
    )


def test_knn_vote_weights_by_hand():
    q = Query(id="q", image=None, prompt="q", options=("a", "b", "c"))
    demos = [_demo(1, "a", [1, 0]), _demo(2, "b", [0, 1]), _demo(3, "a", [0.6, 0.8])]
    student = KNNStudent(VecEmbedder([1, 0]), temperature=0.5)
    # cosines 1, 0, 0.6 -> weights exp((s - 1) / 0.5) = 1, e^-2, e^-0.8
    w = np.array([1.0, math.exp(-2), math.exp(-0.8)])
    w /= w.sum()
    votes = student.votes(q, demos)
    assert votes["a"] == pytest.approx(w[0] + w[2]) and votes["b"] == pytest.approx(w[1])
    pred = student.predict(q, demos)
    assert pred.answer == "a"
    assert pred.option_scores["a"] == pytest.approx(math.log(w[0] + w[2]))
    assert pred.option_scores["c"] < pred.option_scores["b"]  # no vote: a finite floor
    assert margin(pred) == pytest.approx(1 - (w[0] + w[2] - w[1]), abs=1e-5)


def test_knn_without_demos_is_unsure_and_open_answers_copy_the_nearest():
    q = Query(id="q", image=None, prompt="q", options=("a", "b"))
    pred = KNNStudent(VecEmbedder([1, 0])).predict(q, [])
    assert margin(pred) == pytest.approx(1.0)
    open_q = Query(id="q", image=None, prompt="what?")
    demos = [_demo(1, "a cat", [0, 1]), _demo(2, "a dog", [1, 0])]
    assert KNNStudent(VecEmbedder([1, 0])).predict(open_q, demos).answer == "a dog"


def test_baseline_students_and_self_teacher_pass_conformance():
    check_student(KNNStudent(FakeEmbedder()))
    check_student(AbstainingStudent())
    memo = MemoStudent(FakeStudent())
    check_student(memo)
    check_teacher(SelfTeacher(memo))


def test_self_teacher_samples_the_students_own_distribution():
    class Sure:
        name = "sure"

        def predict(self, query, demos):
            return Prediction(answer="red", option_scores={"red": 0.0, "green": -0.5, "blue": -8.0})

    memo = MemoStudent(Sure())
    q = sample_queries()[0]
    memo.predict(q, sample_demos())
    teacher = SelfTeacher(memo, seed=3)
    a = teacher.sample(q, 400).answers
    assert a == teacher.sample(q, 400).answers  # seeded by query position
    p_red = 1 / (1 + math.exp(-0.5) + math.exp(-8.0))
    assert a.count("red") / 400 == pytest.approx(p_red, abs=0.06)
    assert a.count("blue") <= 2
    with pytest.raises(Exception, match="no student prediction"):
        SelfTeacher(MemoStudent(Sure())).sample(q, 1)


def test_knn_or_zero_shot_switches_at_its_cosine():
    from PIL import Image

    from fakes import ColourStudent, FakeEmbedder
    from icdistill.eval.baselines import NearestOrZeroShotStudent

    emb = FakeEmbedder()
    red = Image.new("RGB", (4, 4), (200, 30, 30))
    blue = Image.new("RGB", (4, 4), (30, 40, 200))
    opts = ("red", "green", "blue")
    demo = Demo(id=1, query_id="d", image=red, prompt="c?", answer="green",
                embeddings={IMAGE: emb.embed_query(Query(id="d", image=red, prompt="c?"))[IMAGE]})
    switch = NearestOrZeroShotStudent(ColourStudent(), emb, cos=0.7)
    near = switch.predict(Query(id="a", image=red, prompt="c?", options=opts), [demo])
    assert near.answer == "green" and near.details["switch"] == "nearest-demo"  # the demo, even if wrong
    far = switch.predict(Query(id="b", image=blue, prompt="c?", options=opts), [demo])
    assert far.answer == "blue" and far.details["switch"] == "zero-shot"  # cosine ~0.4: its own reading
    assert switch.predict(Query(id="c", image=red, prompt="c?", options=opts), []).answer == "red"
