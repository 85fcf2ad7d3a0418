import math

import pytest

from icdistill.eval.scores import auroc, cell_scores, corpus_bleu_chrf, exact_match, reliability, token_f1


def test_exact_match_normalises_case_punctuation_and_articles():
    assert exact_match("The Cat.", "cat") == 1.0
    assert exact_match("a red car", "red car!") == 1.0
    assert exact_match("cats", "cat") == 0.0


def test_token_f1_by_hand():
    # answer tokens {red, car, parked}, reference {red, car}: p = 2/3, r = 1, f1 = 0.8
    assert token_f1("a red car parked", "the red car") == pytest.approx(0.8)
    assert token_f1("blue", "red car") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("", "red") == 0.0


def test_auroc_by_hand():
    # wrong answers are more uncertain in 3 of the 4 (wrong, right) pairs -> 0.75
    assert auroc([0.9, 0.4, 0.5, 0.1], [True, True, False, False]) == pytest.approx(0.75)
    # ties count half
    assert auroc([0.5, 0.5], [True, False]) == pytest.approx(0.5)
    assert auroc([0.1, 0.2], [False, False]) is None


def test_auroc_matches_the_pairwise_definition():
    import random

    rng = random.Random(0)
    u = [round(rng.random(), 1) for _ in range(60)]
    wrong = [rng.random() < 0.4 for _ in range(60)]
    pos = [a for a, w in zip(u, wrong, strict=True) if w]
    neg = [a for a, w in zip(u, wrong, strict=True) if not w]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(u, wrong) == pytest.approx(pairs)


def test_reliability_bins_are_equal_count_and_ordered():
    bins = reliability([0.1, 0.2, 0.3, 0.4, 0.8, 0.9], [True, True, True, False, False, False], bins=3)
    assert [b["n"] for b in bins] == [2, 2, 2]
    assert [b["accuracy"] for b in bins] == [1.0, 0.5, 0.0]
    assert bins[0]["uncertainty_mean"] == pytest.approx(0.15)


def test_bleu_and_chrf_bounds():
    same = ["a dog runs on the beach", "two cats sleep on a sofa"]
    bleu, chrf = corpus_bleu_chrf(same, same)
    assert bleu == pytest.approx(100.0) and chrf == pytest.approx(100.0)
    bleu, chrf = corpus_bleu_chrf(["zzz qqq"], ["a dog runs on the beach"])
    assert bleu == pytest.approx(0.0, abs=1e-9) and chrf < 10


def test_cell_scores_open_answers():
    recs = [
        {"event": "query", "label": "cat", "answer": "The cat", "uncertainty": 0.2, "first_correct": True},
        {"event": "query", "label": "red car", "answer": "red", "uncertainty": 0.9, "first_correct": False},
        {"event": "bad_input", "position": 2},
    ]
    s = cell_scores(recs, open_answers=True)
    assert s["exact_match"] == pytest.approx(0.5)
    assert s["token_f1"] == pytest.approx((1.0 + 2 / 3) / 2)  # "red" vs "red car": p=1, r=1/2
    assert s["auroc"] == 1.0
    assert 0 <= s["bleu"] <= 100 and 0 <= s["chrf"] <= 100
    assert "exact_match" not in cell_scores(recs, open_answers=False)
    assert not math.isnan(s["chrf"])
