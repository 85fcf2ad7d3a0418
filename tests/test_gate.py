import math

import numpy as np
import pytest

from icdistill.conformance import check_gate
from icdistill.errors import ICDError
from icdistill.gate import (
    AlwaysGate,
    BudgetGate,
    CappedGate,
    NeverGate,
    RandomGate,
    ThresholdGate,
    gate_score,
    is_forced,
    label_entropy,
    make_gate,
    margin,
    token_entropy,
)
from icdistill.types import GateContext, Prediction


def simulate(gate, us, demos_per_call=1.0):
    calls = 0
    asked = []
    for t, u in enumerate(us):
        ctx = GateContext(position=t, teacher_calls=calls, pool_size=int(calls * demos_per_call))
        d = gate.decide(u, ctx)
        gate.observe(u, ctx, d.ask)
        calls += int(d.ask)
        asked.append(d.ask)
    return np.array(asked)


def test_label_entropy_bounds():
    uniform = Prediction("a", option_scores={"a": -1.0, "b": -1.0, "c": -1.0})
    peaked = Prediction("a", option_scores={"a": 0.0, "b": -30.0, "c": -30.0})
    assert label_entropy(uniform) == pytest.approx(1.0)
    assert label_entropy(peaked) < 1e-6
    mid = Prediction("a", option_scores={"a": 0.0, "b": -1.0, "c": -2.0})
    assert 0 < label_entropy(mid) < 1


def test_margin_and_token_entropy():
    tie = Prediction("a", option_scores={"a": -1.0, "b": -1.0, "c": -5.0})
    sure = Prediction("a", option_scores={"a": 0.0, "b": -10.0})
    assert margin(tie) == pytest.approx(1.0)
    assert margin(sure) < 0.01
    gen = Prediction("x", token_logprobs=[-0.1, -0.2], token_entropies=[0.5, 1.5])
    assert token_entropy(gen) == pytest.approx(1.0)
    assert label_entropy(gen) == pytest.approx(1.0)  # falls back to token entropy
    assert 0 < margin(gen) < 1


@pytest.mark.parametrize(
    "gate", [AlwaysGate(), NeverGate(), ThresholdGate(0.5), BudgetGate(0.1), CappedGate(AlwaysGate(), 3)]
)
def test_conformance(gate):
    check_gate(gate)


def test_threshold_gate():
    g = ThresholdGate(0.5)
    ctx = GateContext(0, 0, 0)
    assert g.decide(0.6, ctx).ask and not g.decide(0.4, ctx).ask
    assert "0.600" in g.decide(0.6, ctx).reason


@pytest.mark.parametrize("rate", [0.03, 0.05, 0.15])
@pytest.mark.parametrize("drift", [False, True])
def test_budget_gate_holds_rate_on_long_stream(rate, drift):
    rng = np.random.default_rng(1)
    n = 5000
    us = rng.beta(2, 5, size=n)
    if drift:  # the student gets surer as the pool grows: a fixed threshold would stop asking
        us = us * np.linspace(1.0, 0.2, n)
    asked = simulate(BudgetGate(rate, warmup=10), us)
    assert abs(asked.mean() - rate) <= 0.01
    # and it spends on the uncertain queries, not at random
    assert us[asked].mean() > us[~asked].mean()
    # the rate holds locally too, not only on average (second half of the stream)
    assert abs(asked[n // 2 :].mean() - rate) <= 0.01


def test_budget_gate_warmup_asks_first_within_its_share_of_the_budget():
    g = BudgetGate(0.05, warmup=5)
    asked = simulate(g, [0.0] * 50)  # uncertainty 0: only the warm-up and pacing make it ask
    # at 5% the warm-up may run 2 calls ahead of the allowance: the first three queries, not five
    assert asked[:3].all() and not asked[3:19].any()
    # while the pool is below the warm-up, later asks keep within 2 calls of the allowance
    calls = np.cumsum(asked)
    assert all(calls[t] - 1 < 0.05 * (t + 1) + 2 for t in range(50) if asked[t])


def test_on_a_100_query_stream_at_5_percent_the_gate_chooses_calls_after_the_warm_up():
    """The warm-up must fit the budget: it may not take every call of a short stream."""
    rng = np.random.default_rng(0)
    for seed in range(5):
        us = np.random.default_rng(seed).beta(2, 5, size=100)
        g = BudgetGate(0.05)
        calls, reasons = 0, []
        for t, u in enumerate(us):
            ctx = GateContext(position=t, teacher_calls=calls, pool_size=calls)
            d = g.decide(float(u), ctx)
            g.observe(float(u), ctx, d.ask)
            calls += int(d.ask)
            if d.ask:
                reasons.append(d.reason)
        warm = [r for r in reasons if r.startswith("warm-up")]
        assert len(warm) == 3, reasons
        assert len(reasons) - len(warm) >= 1, reasons
        assert any(not is_forced(r) for r in reasons), reasons
    assert rng is not None


def test_each_question_kind_gets_its_share_of_the_budget_and_its_own_warm_up():
    """A stream of option and open questions: the warm-up must not go to the kind that came first."""
    n = 400
    kinds = ["options"] * 100 + ["options", "open"] * 150
    us = np.random.default_rng(3).beta(2, 5, size=n)
    g = BudgetGate(0.05)
    pool = {"options": 0, "open": 0}
    calls = 0
    asked_kinds = []
    for t in range(n):
        k = kinds[t]
        ctx = GateContext(position=t, teacher_calls=calls, pool_size=pool[k], kind=k)
        d = g.decide(float(us[t]), ctx)
        g.observe(float(us[t]), ctx, d.ask)
        if d.ask:
            calls += 1
            pool[k] += 1
            asked_kinds.append(k)
    seen = {k: kinds.count(k) for k in pool}
    for k in pool:
        assert asked_kinds.count(k) >= 3  # its own warm-up
        assert abs(asked_kinds.count(k) / seen[k] - 0.05) <= 0.015, (k, asked_kinds.count(k), seen[k])


def test_the_coverage_score_asks_where_the_pool_is_blind_and_the_stream_is_dense():
    g = BudgetGate(0.1, score="coverage")
    covered = GateContext(50, 5, 5, signals={"nearest_demo_similarity": 0.9, "typicality": 0.8})
    blind_typical = GateContext(50, 5, 5, signals={"nearest_demo_similarity": 0.2, "typicality": 0.8})
    blind_outlier = GateContext(50, 5, 5, signals={"nearest_demo_similarity": 0.2, "typicality": 0.1})
    assert gate_score("coverage", 0.9, covered) < gate_score("coverage", 0.0, blind_outlier)
    assert gate_score("coverage", 0.0, blind_outlier) < gate_score("coverage", 0.0, blind_typical)
    # no demo of the kind pooled yet: fully blind; typicality unknown early on: neutral
    assert gate_score("coverage", 0.0, GateContext(0, 0, 0)) == 1.0
    # uncertainty still breaks ties in the combined score
    assert gate_score("coverage-uncertainty", 0.9, blind_typical) > gate_score(
        "coverage-uncertainty", 0.1, blind_typical
    )
    for t in range(60):  # history of covered queries, on budget, then a blind one is asked
        ctx = GateContext(t, t // 10, 5, signals={"nearest_demo_similarity": 0.9, "typicality": 0.8})
        g.observe(0.5, ctx, t % 10 == 0)
    d = g.decide(0.0, GateContext(60, 6, 5, signals={"nearest_demo_similarity": 0.2, "typicality": 0.8}))
    assert d.ask and "coverage score" in d.reason and not is_forced(d.reason)


def test_budget_gate_warmup_respects_rejections():
    # annotations rejected (pool stays empty): warm-up spend is still capped
    g = BudgetGate(0.05, warmup=5)
    asked = simulate(g, [1.0] * 40, demos_per_call=0.0)
    assert asked.sum() <= 5


def test_capped_gate_stops_at_cap():
    asked = simulate(CappedGate(AlwaysGate(), max_calls=7), np.ones(100))
    assert asked.sum() == 7
    g = CappedGate(AlwaysGate(), max_cost_usd=1.0)
    g.add_cost(1.5)
    d = g.decide(1.0, GateContext(0, 0, 0))
    assert not d.ask and "cost cap" in d.reason


def test_make_gate_validation():
    with pytest.raises(ICDError):
        make_gate("sometimes")
    with pytest.raises(ICDError):
        make_gate("budget", budget=0.0)
    assert isinstance(make_gate("budget", max_calls=3), CappedGate)
    assert math.isfinite(make_gate("threshold", delta=0.3).delta)


def synthetic_stream(gate, n, drift, seed, kinds=None):
    """A stream whose uncertainty falls as the pool grows (drift); every ask adds a demo."""
    rng = np.random.default_rng(seed)
    base = rng.beta(2, 5, size=n)
    calls, asked, us = 0, np.zeros(n, dtype=bool), np.zeros(n)
    for t in range(n):
        us[t] = base[t] * (0.3 + 0.7 * np.exp(-calls / 15) if drift else 1.0)
        kind = kinds[t] if kinds is not None else ""
        ctx = GateContext(position=t, teacher_calls=calls, pool_size=calls, kind=kind)
        d = gate.decide(float(us[t]), ctx)
        gate.observe(float(us[t]), ctx, d.ask)
        asked[t] = d.ask
        calls += int(d.ask)
    return asked, us


def local_percentile(asked, us, skip=20):
    """Mean percentile of the asked queries' uncertainties among the 100 queries around them."""
    pcts = [(us[max(0, t - 50) : t + 50] < us[t]).mean() for t in np.flatnonzero(asked) if t >= skip]
    return float(np.mean(pcts))


@pytest.mark.parametrize("rate", [0.05, 0.10, 0.20])
@pytest.mark.parametrize("n", [300, 1000])
@pytest.mark.parametrize("drift", [True, False])
def test_budget_gate_rate_within_half_a_point_warmup_included(rate, n, drift):
    # before: 3.9-4.0% at 5% on 300 drifting queries (warm-up spend ahead of schedule, then a stale
    # 500-wide window holding the threshold above current uncertainties)
    for seed in range(5):
        asked, us = synthetic_stream(BudgetGate(rate, warmup=5), n, drift, seed)
        assert abs(asked.mean() - rate) <= 0.005, (seed, asked.mean())
        assert local_percentile(asked, us) > 0.7  # still the uncertain ones (random: 0.5)


@pytest.mark.parametrize("rate", [0.05, 0.10, 0.20])
def test_random_gate_paced_as_tightly_as_budget_gate(rate):
    # before: 19.0% at a 20% target over 1,000 queries
    for seed in range(5):
        asked, us = synthetic_stream(RandomGate(rate, warmup=5, seed=seed), 1000, True, seed)
        assert abs(asked.mean() - rate) <= 0.005, (seed, asked.mean())
        assert local_percentile(asked, us) < 0.65
        budget_asked, budget_us = synthetic_stream(BudgetGate(rate, warmup=5), 1000, True, seed)
        assert local_percentile(budget_asked, budget_us) > local_percentile(asked, us) + 0.2


def test_budget_gate_statistics_per_uncertainty_kind():
    # option entropy in [0.7, 0.97] and token entropy in [2.3, 3.4] in one stream: one quantile
    # sent only open questions to the teacher
    rng = np.random.default_rng(0)
    n = 1000
    kinds = np.where(rng.random(n) < 0.5, "options", "open")
    g = BudgetGate(0.1, warmup=5)
    calls, asked = 0, []
    for t in range(n):
        u = rng.uniform(0.7, 0.97) if kinds[t] == "options" else rng.uniform(2.3, 3.4)
        ctx = GateContext(position=t, teacher_calls=calls, pool_size=calls, kind=str(kinds[t]))
        d = g.decide(u, ctx)
        g.observe(u, ctx, d.ask)
        asked.append(d.ask)
        calls += int(d.ask)
    asked = np.array(asked)
    late = np.arange(n) >= 100
    share_options = (asked & late & (kinds == "options")).sum() / (asked & late).sum()
    assert 0.3 < share_options < 0.7


def test_nan_uncertainty_is_the_most_uncertain():
    nan_pred = Prediction("a", option_scores={"a": -math.inf, "b": -math.inf})
    assert label_entropy(nan_pred) == 1.0 and margin(nan_pred) == 1.0
    g = BudgetGate(0.2, warmup=0, min_history=5)
    asked = simulate(g, np.linspace(0.1, 0.9, 30))
    for t in range(30, 40):  # certain queries, not asked: the gate is on budget again
        g.observe(0.0, GateContext(position=t, teacher_calls=int(asked.sum()), pool_size=6), False)
    ctx = GateContext(position=40, teacher_calls=int(asked.sum()), pool_size=6)
    assert g.decide(math.nan, ctx).ask  # before: NaN > threshold is False, never asked
    before = len(g.history_[""])
    g.observe(math.nan, ctx, True)
    assert len(g.history_[""]) == before + 1  # and it enters the history
    assert ThresholdGate(0.5).decide(math.nan, GateContext(0, 0, 0)).ask


def test_rate_one_asks_a_new_minimum():
    g = BudgetGate(1.0, warmup=0, min_history=5)
    asked = simulate(g, [0.5] * 30 + [0.01])
    assert asked.all()


def test_cost_cap_reserves_the_dearest_call():
    g = CappedGate(AlwaysGate(), max_cost_usd=1.0)
    g.add_cost(0.4)
    g.add_cost(0.4)
    # $0.80 spent, the next call likely costs $0.40: asking would end at $1.20 > $1.00
    d = g.decide(1.0, GateContext(2, 2, 2))
    assert not d.ask and "cost cap" in d.reason
    g2 = CappedGate(AlwaysGate(), max_cost_usd=1.0)
    g2.add_cost(0.3)
    assert g2.decide(1.0, GateContext(1, 1, 1)).ask
