"""The student's mixture of its own reading and the demos' vote, weighted by the nearest demo's
similarity and learned from the teacher's answers (no model)."""

import numpy as np
import pytest

from icdistill.errors import ICDError
from icdistill.mixture import SimilarityMixture, temper, vote

OPTIONS = ("a", "b", "c")


def unit(*v: float) -> np.ndarray:
    x = np.array(v, dtype=np.float32)
    return x / np.linalg.norm(x)


def test_vote_by_hand():
    v = vote(np.array([1.0, 0.0]), ["a", "b"], OPTIONS, 0.5)
    w_b = np.exp(-2.0) / (1 + np.exp(-2.0))
    assert v == pytest.approx([1 - w_b, w_b, 0.0])
    assert vote(np.array([0.3]), ["not an option"], OPTIONS, 0.1).sum() == 0.0


def test_checks_replay_the_vote_of_the_other_taught_queries_and_of_the_other_labels():
    m = SimilarityMixture(shots=1, temperature=0.05)
    m.teach(OPTIONS, unit(1, 0, 0), np.array([0.6, 0.3, 0.1]), "a")
    assert len(m.checks(OPTIONS)[0]) == 0  # one taught query checks nothing
    m.teach(OPTIONS, unit(1, 0.1, 0), np.array([0.2, 0.7, 0.1]), "a")
    m.teach(OPTIONS, unit(0, 0, 1), np.array([0.1, 0.1, 0.8]), "c")
    near, p = m.checks(OPTIONS)
    t = m.zero_shot_temperature(OPTIONS)
    zs0 = temper(np.array([0.6, 0.3, 0.1]), t)[0]
    # query 0 left out: its nearest other (query 1) says "a", the vote right, at their similarity
    assert near[0] == pytest.approx(float(unit(1, 0, 0) @ unit(1, 0.1, 0)), abs=1e-6)
    assert p[0] == pytest.approx([1.0, zs0])
    # label "a" left out: the nearest of another label (query 2, "c") is far and wrong
    assert near[1] == pytest.approx(0.0, abs=1e-6) and p[1, 0] == pytest.approx(1e-4)
    assert len(near) == 6  # two checks for each of the three queries


def test_the_zero_shot_reading_is_sharpened_where_it_reads_right_and_flattened_where_not():
    right, wrong = SimilarityMixture(), SimilarityMixture()
    for i in range(8):
        y = OPTIONS[i % 3]
        p = np.full(3, 0.3)
        p[i % 3] = 0.4
        right.teach(OPTIONS, unit(1, i), p, y)  # argmax right, but flat
        wrong.teach(OPTIONS, unit(1, i), p, OPTIONS[(i + 1) % 3])  # argmax wrong
    assert right.zero_shot_temperature(OPTIONS) < 0.5 < 1.0 < wrong.zero_shot_temperature(OPTIONS)
    sharp = right.zero_shot(OPTIONS, np.array([0.4, 0.3, 0.3]))
    assert sharp[0] > 0.7


def test_the_vote_weighs_more_where_near_demos_were_right_and_less_where_far_ones_were_wrong():
    rng = np.random.default_rng(0)
    m = SimilarityMixture(shots=2)
    assert m.vote_weight(OPTIONS, 0.5) == 0.5  # nothing learned: even
    # near-duplicates of each class (the vote right at ~0.99), classes far apart (cos ~0), and a
    # zero-shot reading that knows nothing
    for i in range(12):
        label = OPTIONS[i % 3]
        base = np.eye(3)[i % 3] + 0.05 * rng.standard_normal(3)
        m.teach(OPTIONS, base, np.full(3, 1 / 3), label)
    near, p = m.checks(OPTIONS)
    assert near[::2].min() > 0.9 and near[1::2].max() < 0.2  # left out: a twin; label left out: far
    assert m.vote_weight(OPTIONS, 0.98) > 0.8
    assert m.vote_weight(OPTIONS, 0.05) < 0.1
    far = SimilarityMixture(shots=1, bandwidth=0.1)
    for k in range(6):  # each query alone in its direction: nearest others at cos 0.1-0.3, other labels
        v = np.zeros(8)
        v[k] = 1.0
        v[(k + 1) % 8] = 0.3
        zs = np.full(3, 0.1)
        zs[k % 3] = 0.8
        far.teach(OPTIONS, v, zs, OPTIONS[k % 3])
    assert far.vote_weight(OPTIONS, 0.2) < 0.15
    # far from every check: the prior holds it near even
    assert 0.4 < far.vote_weight(OPTIONS, 0.95) < 0.6


def test_option_sets_learn_apart_and_bad_settings_are_refused():
    m = SimilarityMixture()
    m.teach(OPTIONS, unit(1, 0), np.array([0.5, 0.5, 0.0]), "a")
    m.teach(OPTIONS, unit(1, 0), np.array([0.5, 0.5, 0.0]), "a")
    assert m.taught(OPTIONS) == 2 and m.taught(("x", "y")) == 0
    m.teach(OPTIONS, unit(1, 0), np.array([0.5, 0.5, 0.0]), "not an option")  # ignored
    assert m.taught(OPTIONS) == 2
    assert m.vote_weight(("x", "y"), 0.9) == 0.5
    with pytest.raises(ICDError):
        SimilarityMixture(bandwidth=0.0)


def _brute_checks(m: SimilarityMixture, rows: list[tuple[np.ndarray, np.ndarray, str]]):
    """The checks recomputed from scratch over ``rows`` (what ``checks`` must equal)."""
    feats = np.stack([f / np.linalg.norm(f) for f, _, _ in rows]).astype(np.float32)
    sims = feats @ feats.T
    np.fill_diagonal(sims, -np.inf)
    labels = np.array([a for _, _, a in rows])
    t = m.zero_shot_temperature(OPTIONS)
    near, p = [], []
    for i, (_, zs, ans) in enumerate(rows):
        y = OPTIONS.index(ans)
        for others in (np.flatnonzero(np.isfinite(sims[i])), np.flatnonzero(labels != ans)):
            if not len(others):
                continue
            top = others[np.argsort(-sims[i, others], kind="stable")[: m.shots]]
            v = vote(sims[i, top], [rows[j][2] for j in top], OPTIONS, m.temperature)
            near.append(float(sims[i, top[0]]))
            p.append((float(v[y]), float(temper(zs, t)[y])))
    return np.array(near), np.maximum(np.array(p).reshape(-1, 2), 1e-4)


def test_checks_kept_up_to_date_one_taught_query_at_a_time_equal_the_checks_from_scratch():
    rng = np.random.default_rng(1)
    m = SimilarityMixture(shots=2, max_taught=25)
    rows: list[tuple[np.ndarray, np.ndarray, str]] = []
    for i in range(60):
        # a few repeated images (tied similarities, the same answer: which twin is nearer is a matter
        # of rounding) and a class that comes late
        label = OPTIONS[2] if i > 20 and i % 4 == 0 else OPTIONS[i % 2]
        f, label = (rows[i - 7][0], rows[i - 7][2]) if i % 9 == 8 else (rng.standard_normal(6), label)
        row = (np.asarray(f, dtype=np.float32), rng.dirichlet(np.ones(3)), label)
        rows.append(row)
        m.teach(OPTIONS, *row)
        if i % 5 == 0 or i > 50:
            near, p = m.checks(OPTIONS)
            want_near, want_p = _brute_checks(m, rows[-25:])
            assert near == pytest.approx(want_near, abs=1e-6) and p == pytest.approx(want_p, abs=1e-6)
    assert m.taught(OPTIONS) == 25


def test_a_long_taught_stream_costs_no_square_per_teach():
    # the checks were recomputed from scratch (n x n similarities, a sort per row) after every
    # teach: 1-2 s per teacher answer at 2000 taught queries, hours over a 5000-query budget
    import time

    rng = np.random.default_rng(0)
    m = SimilarityMixture(max_taught=5000)
    for i in range(2500):
        m.teach(OPTIONS, rng.standard_normal(64), rng.dirichlet(np.ones(3)), OPTIONS[i % 3])
    m.vote_weight(OPTIONS, 0.5)
    t0 = time.perf_counter()
    for i in range(10):
        m.teach(OPTIONS, rng.standard_normal(64), rng.dirichlet(np.ones(3)), OPTIONS[i % 3])
        m.vote_weight(OPTIONS, 0.5)
    assert time.perf_counter() - t0 < 2.0


def test_a_mixture_with_other_shots_is_re_taught_the_same_queries():
    rng = np.random.default_rng(2)
    m = SimilarityMixture(shots=2)
    for i in range(12):
        m.teach(OPTIONS, rng.standard_normal(5), rng.dirichlet(np.ones(3)), OPTIONS[i % 3])
    five = m.with_shots(5)
    assert five.shots == 5 and five.taught(OPTIONS) == 12
    fresh = SimilarityMixture(shots=5)
    for f, z, a in zip(m._taught[OPTIONS].features[:12], m._taught[OPTIONS].zero_shot, m._taught[OPTIONS].answers, strict=True):
        fresh.teach(OPTIONS, f, z, a)
    assert np.array_equal(five.checks(OPTIONS)[1], fresh.checks(OPTIONS)[1])
