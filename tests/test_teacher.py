import pytest

from fakes import FakeTeacher
from icdistill.conformance import check_teacher, sample_queries
from icdistill.errors import ICDError, TeacherError
from icdistill.models.reference import ReferenceTeacher
from icdistill.models.registry import resolve_teacher
from icdistill.teacher import TestTimeScaling, match_option, normalise_answer, vote


def test_normalise_and_match():
    assert normalise_answer("  The Ankle-Boot. ") == "ankle boot"
    opts = ["T-shirt/top", "Ankle boot", "Sandal"]
    assert match_option("an ankle boot", opts) == "Ankle boot"
    assert match_option("sandal", opts) == "Sandal"
    assert match_option("t shirt top", opts) == "T-shirt/top"
    assert match_option("a giraffe", opts) is None


def test_vote_majority_and_agreement():
    ans, votes, agr = vote(["cat", "Cat.", "dog"])
    assert ans == "cat" and votes == {"cat": 2, "dog": 1} and agr == pytest.approx(2 / 3)
    ans, votes, agr = vote(["red", "blue", "garbage"], options=["red", "blue"])
    assert agr == pytest.approx(1 / 3) and set(votes) == {"red", "blue"}
    assert vote([]) == ("", {}, 0.0)
    assert vote(["xyz"], options=["a", "b"])[0] == ""


def test_vote_captions_medoid():
    caps = ["a dog runs on the grass", "a dog running on grass", "a cat sleeps on a sofa"]
    ans, _, agr = vote(caps, long_form=True)
    assert "dog" in ans and 0 < agr < 1


def test_tts_rejects_low_agreement():
    q = sample_queries()[0]
    tts = TestTimeScaling(FakeTeacher(wrong_every=2), n=4, agreement_floor=0.75)
    ann = tts.annotate(q)
    assert ann.agreement == pytest.approx(0.5) and not ann.accepted
    ok = TestTimeScaling(FakeTeacher(), n=3, agreement_floor=0.75).annotate(q)
    assert ok.accepted and ok.answer == q.label and ok.usage.calls == 1


def test_tts_validation_and_failure():
    with pytest.raises(ICDError):
        TestTimeScaling(FakeTeacher(), n=0)
    with pytest.raises(TeacherError):
        TestTimeScaling(FakeTeacher(fail=True)).annotate(sample_queries()[0])


def test_reference_teacher_conformance_and_noise():
    check_teacher(ReferenceTeacher())
    check_teacher(FakeTeacher())
    q = sample_queries()[0]
    clean = ReferenceTeacher().sample(q, 5).answers
    assert clean == [q.label] * 5
    noisy = ReferenceTeacher(noise=0.4, seed=3)
    answers = [a for _ in range(200) for a in noisy.sample(q, 1).answers]
    wrong = sum(a != q.label for a in answers) / len(answers)
    assert 0.3 < wrong < 0.5
    assert all(a in q.options for a in answers)


def test_voting_removes_reference_noise():
    qs = sample_queries() * 100
    single = TestTimeScaling(ReferenceTeacher(noise=0.3, seed=1), n=1)
    voted = TestTimeScaling(ReferenceTeacher(noise=0.3, seed=1), n=7)
    acc1 = sum(single.annotate(q).answer == q.label for q in qs) / len(qs)
    acc7 = sum(voted.annotate(q).answer == q.label for q in qs) / len(qs)
    assert acc7 > acc1 + 0.15


def test_reference_spec():
    t = resolve_teacher("reference:noise=0.2")
    assert isinstance(t, ReferenceTeacher) and t.noise == 0.2
    with pytest.raises(ICDError):
        resolve_teacher("reference:noise=2")
    with pytest.raises(TeacherError):
        ReferenceTeacher().sample(sample_queries()[0].__class__(id="x", image=None, prompt="p"), 1)


FASHION = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
]  # fmt: skip


@pytest.mark.parametrize("answer", ["T-shirt", "a t-shirt", "tshirt", "t shirt", "T-shirts", "top"])
def test_match_option_t_shirt_is_not_shirt(answer):
    # "t shirt" contains "shirt": a containment match put T-shirts into the pool as "Shirt"
    assert match_option(answer, FASHION) == "T-shirt/top"


def test_match_option_whole_phrases_both_ways_and_ambiguity():
    assert match_option("a shirt", FASHION) == "Shirt"
    assert match_option("It is a sneaker.", FASHION) == "Sneaker"
    assert match_option("boot", FASHION) == "Ankle boot"  # answer inside one option
    assert match_option("sandals", FASHION) == "Sandal"
    assert match_option("shirt or coat", FASHION) is None  # names two options: not forced onto one
    assert match_option("sneakr", FASHION) == "Sneaker"


def test_empty_or_article_only_answer_matches_nothing():
    for text in ("", "  ", "the", "a.", "An"):
        assert match_option(text, ["B", "C", "D"]) is None
    assert match_option("", ["A", "B"]) is None and match_option("the", list("ABCD")) is None
    assert match_option("A", list("ABCD")) == "A" and match_option("(b)", list("ABCD")) == "B"
    assert match_option("a shirt", list("ABCD")) is None
    ans, votes, agr = vote(["", "", "B"], options="ABCD")
    assert ans == "B" and votes == {"B": 1} and agr == pytest.approx(1 / 3)


def test_vote_ties_and_empty_answers():
    ans, votes, agr = vote(["cat", "dog"])  # a 1-1 tie has no winner
    assert ans == "" and votes == {"cat": 1, "dog": 1} and agr == pytest.approx(0.5)
    assert vote(["red", "blue"], options=["red", "blue"])[0] == ""
    assert vote(["", "", "cat"]) == ("cat", {"cat": 1}, pytest.approx(1 / 3))  # "" never wins
    assert vote(["", " "]) == ("", {}, 0.0)
    long = vote(["", "a dog runs on the grass", "a dog running on grass"], long_form=True)
    assert long[0] != ""


def test_tts_rejects_ties_even_with_a_half_floor():
    class Split(FakeTeacher):
        def sample(self, query, n):
            resp = super().sample(query, n)
            resp.answers = [query.options[0], query.options[1]]
            return resp

    q = sample_queries()[0]
    ann = TestTimeScaling(Split(), n=2, agreement_floor=0.5).annotate(q)
    assert not ann.accepted and ann.answer == ""
