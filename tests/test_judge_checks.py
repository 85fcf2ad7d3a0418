"""The judge's checks weighed to the stream's mix of queries whose class is pooled and queries whose class
is not (``icdistill.judge_checks``): the label-left-out checks stand for a case that becomes rare once
the teacher has answered every class."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from icdistill.judge_checks import JudgeChecks, JudgeConfig, regime_weights, unseen_mass

OPTIONS = ("a", "b", "c")


def test_the_unseen_mass_is_high_before_the_teacher_has_seen_every_label_and_low_after():
    assert unseen_mass(Counter(), 3) == 0.98  # nothing answered: every query may be of a new label
    assert unseen_mass(Counter(a=1, b=1), 3) == 0.98  # every answer a first: Good-Turing says 1
    assert unseen_mass(Counter(a=5, b=4, c=6), 3) == 0.02  # every label seen, none once
    # two of four labels never answered (a gate that has not reached them): the Dirichlet share
    assert unseen_mass(Counter(a=4, b=4), 4) == pytest.approx(2 / 12)
    assert unseen_mass(Counter(a=1, b=3, c=4), 3) == pytest.approx(1 / 8)  # Good-Turing


def test_regime_weights_give_each_case_its_mass_and_keep_the_total():
    unpooled = np.array([True, True, True, False])
    w = regime_weights(unpooled, 0.1)
    assert w.sum() == pytest.approx(4.0)
    assert w[unpooled].sum() == pytest.approx(0.4) and w[~unpooled].sum() == pytest.approx(3.6)
    assert np.allclose(regime_weights(np.array([True, True]), 0.1), 1.0)  # one case only: unweighted


def _checks(reweight: bool) -> JudgeChecks:
    """Twelve teacher answers, four of each label, every check at cosine 0.97 (the kernel cannot tell
    the cases apart): where the label was pooled the ICL reading and the vote were right and the
    zero-shot reading wrong; with the label left out of the demos the other way round."""
    checks = JudgeChecks(2, JudgeConfig(reweight=reweight))
    for i in range(12):
        y = i % 3
        other = (y + 1) % 3
        right, wrong = np.full(3, 0.1), np.full(3, 0.1)
        right[y], wrong[other] = 0.8, 0.8
        first = checks.count_answer(OPTIONS, OPTIONS[y])
        checks.add_met(OPTIONS, y, 0.97, right, wrong, np.eye(3)[y], unpooled=first)
        checks.add_met(OPTIONS, y, 0.97, wrong, right, np.eye(3)[other], unpooled=True)
    return checks


def test_once_every_label_is_pooled_the_label_left_out_checks_stop_outvoting_the_rest():
    w_flat, _, _ = _checks(reweight=False).weights(OPTIONS, 0.97)
    w, t_icl, _ = _checks(reweight=True).weights(OPTIONS, 0.97)
    # unweighted, the left-out checks (15 of 24) make the zero-shot reading the heaviest expert
    assert w_flat[1] > w_flat[0] and w_flat[1] > w_flat[2]
    # weighed to the stream (every label answered four times: the unpooled case is rare), the
    # experts right where the label is pooled carry the mixture
    assert w[0] + w[2] > 0.8 and w[1] < 0.2
    assert t_icl < 1.0  # and the ICL reading, right there, is sharpened, not flattened


def test_the_judge_marks_a_label_s_first_answer_and_every_label_left_out_check_unpooled():
    from fakes import FakeStudent
    from icdistill.judge import Judge

    judge = Judge(FakeStudent(), 2)
    p = [0.6, 0.2, 0.2]
    for answer in ("a", "a", "b"):  # teach events as the log holds them (no sketch: no synthetic check)
        judge.replay({"judge_events": [["teach", list(OPTIONS), answer, None, 0.5, p, p, p]]})
    judge.replay({"judge_events": [["check", list(OPTIONS), "a", 0.4, p, p, p]]})
    assert judge.checks._met[OPTIONS].unpooled == [True, False, True, True]
    # a teach without a met check (no demos shown) still counts its label
    judge.replay({"judge_events": [["teach", list(OPTIONS), "c", None, None, None, p, None]]})
    assert judge.checks._labels[OPTIONS] == Counter(a=2, b=1, c=1)
    assert unseen_mass(judge.checks._labels[OPTIONS], 3) == pytest.approx(2 / 4)


def test_where_the_near_checks_are_all_of_one_case_they_keep_their_strength():
    """Far from the pool (cosine 0.2) every check is of the unpooled case, near it (0.95) every one is
    pooled: the stream's mix shares the checks between the cases, not the evidence near a query."""

    def checks(reweight: bool) -> JudgeChecks:
        c = JudgeChecks(2, JudgeConfig(reweight=reweight))
        right, wrong = np.array([0.8, 0.1, 0.1]), np.array([0.1, 0.8, 0.1])
        for i in range(12):
            first = c.count_answer(OPTIONS, OPTIONS[i % 3])
            c.add_met(OPTIONS, 0, 0.95, right, wrong, np.eye(3)[0], unpooled=first)  # ICL and vote right
            c.add_met(OPTIONS, 0, 0.2, wrong, right, np.eye(3)[1], unpooled=True)  # the zero-shot reading
        return c

    flat, weighed = checks(False), checks(True)
    far_flat, far = flat.weights(OPTIONS, 0.2)[0], weighed.weights(OPTIONS, 0.2)[0]
    assert far[1] > 0.6 and np.allclose(far, far_flat, atol=0.05)  # the zero-shot reading, as before
    assert weighed.weights(OPTIONS, 0.95)[0][1] < 0.2
