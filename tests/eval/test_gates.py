import numpy as np

from icdistill.eval.gates import FixedCountRandomGate
from icdistill.eval.scores import gate_forced
from icdistill.types import GateContext


def _simulate(gate, n, accept=lambda pos: True):
    calls, pool, asked = 0, 0, []
    for pos in range(n):
        ctx = GateContext(pos, calls, pool, "options")
        d = gate.decide(0.5, ctx)
        assert gate.decide(0.5, ctx) == d  # decide changes nothing
        gate.observe(0.5, ctx, d.ask)
        if d.ask:
            calls += 1
            pool += int(accept(pos))
            asked.append((pos, d.reason))
    return asked


def test_fixed_count_gate_makes_exactly_the_count_after_the_same_warm_up():
    for seed in range(6):
        for calls in (0, 3, 5, 9, 40):
            asked = _simulate(FixedCountRandomGate(calls, 40, warmup=3, seed=seed), 40)
            assert len(asked) == min(calls, 40)
            assert [p for p, _ in asked[:3]] == list(range(min(calls, 3)))  # the warm-up comes first
            assert all(r.startswith("warm-up") for _, r in asked[: min(calls, 3)])
    # the non-forced picks differ by seed and are the gate's own choice
    picks = {
        tuple(p for p, _ in _simulate(FixedCountRandomGate(8, 40, warmup=3, seed=s), 40)) for s in range(5)
    }
    assert len(picks) > 1
    chosen = [r for p, r in _simulate(FixedCountRandomGate(8, 40, warmup=3, seed=1), 40)]
    assert any(not gate_forced({"gate_reason": r}) for r in chosen)


def test_fixed_count_gate_spreads_its_calls_uniformly():
    hits = np.zeros(40)
    for seed in range(400):
        for p, _ in _simulate(FixedCountRandomGate(8, 40, warmup=0, seed=seed), 40):
            hits[p] += 1
    assert hits.sum() == 400 * 8
    assert hits.min() > 0.5 * 80 and hits.max() < 1.5 * 80  # about 8/40 of the seeds at every position


def test_forced_is_read_from_the_record_or_its_reason():
    assert gate_forced({"gate_forced": True, "gate_reason": "uncertainty 0.9 > quantile 0.5"})
    assert not gate_forced({"gate_forced": False, "gate_reason": "warm-up: pool 0 < 5"})
    for reason in (
        "warm-up: pool 0 < 5",
        "behind budget: 1 calls < 2.4 allowed",
        "calibrating: behind budget",
    ):
        assert gate_forced({"gate_reason": reason})
    assert not gate_forced({"gate_reason": "uncertainty 0.712 > quantile 0.500"})
