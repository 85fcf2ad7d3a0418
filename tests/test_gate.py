import math

import numpy as np
import pytest

from icdistill.conformance import check_gate
from icdistill.gate import (
    AlwaysGate,
    BudgetGate,
    CappedGate,
    NeverGate,
    ThresholdGate,
    label_entropy,
    make_gate,
    margin,
    token_entropy,
)
from icdistill.types import GateContext, ICDError, Prediction


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


def test_budget_gate_warmup_asks_until_pool_filled():
    g = BudgetGate(0.05, warmup=5)
    asked = simulate(g, [0.0] * 50)  # uncertainty 0: only the warm-up makes it ask
    assert asked[:5].all()
    assert asked.sum() >= 5
    assert not asked[5:20].any()


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
