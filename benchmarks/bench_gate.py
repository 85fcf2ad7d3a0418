"""The budget gate on synthetic uncertainty streams: achieved teacher-call rate and selectivity.

Usage: ``.venv/bin/python benchmarks/bench_gate.py [--seeds 20]``. Writes ``benchmarks/results/gate.json``
and ``gate.md``. Pure Python (no models): a stream's uncertainty is ``base * g(pool)``, ``base`` drawn
from Beta(2, 5) per query; ``g`` is 1 (stationary) or falls from 1 to 0.3 as teacher answers fill the
pool (drifting: the student gets surer, the case a fixed threshold fails). Every ask adds one demo.
Warm-up calls are included in the rate. Selectivity: the asked queries' mean uncertainty percentile
among the 100 queries around them (0.5 = random), and the share of asks that fall in that window's
top ``rate`` quantile; ``RandomGate`` at the same rate is the same-run baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np

from icdistill.gate import BudgetGate, RandomGate
from icdistill.protocols import Gate
from icdistill.types import GateContext

RESULTS = Path(__file__).parent / "results"


def simulate(gate: Gate, n: int, drift: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(asked, uncertainties) of one stream of ``n`` queries."""
    rng = np.random.default_rng(seed)
    base = rng.beta(2, 5, size=n)
    asked = np.zeros(n, dtype=bool)
    us = np.zeros(n)
    calls = 0
    for t in range(n):
        g = 0.3 + 0.7 * np.exp(-calls / 15) if drift else 1.0
        us[t] = base[t] * g
        ctx = GateContext(position=t, teacher_calls=calls, pool_size=calls)
        d = gate.decide(float(us[t]), ctx)
        gate.observe(float(us[t]), ctx, d.ask)
        asked[t] = d.ask
        calls += int(d.ask)
    return asked, us


def selectivity(asked: np.ndarray, us: np.ndarray, rate: float, skip: int) -> tuple[float, float]:
    """Mean local percentile of the asked queries' uncertainties, and the share in the local top ``rate``."""
    pcts, top = [], []
    for t in np.flatnonzero(asked):
        if t < skip:
            continue  # warm-up asks are not chosen by uncertainty
        lo, hi = max(0, t - 50), min(len(us), t + 50)
        window = us[lo:hi]
        pct = float((window < us[t]).mean())
        pcts.append(pct)
        top.append(pct >= 1.0 - max(rate, 1.0 / len(window)))
    return (statistics.fmean(pcts), statistics.fmean(top)) if pcts else (float("nan"), float("nan"))


def measure(
    make: Callable[[float, int], Gate], rate: float, n: int, drift: bool, seeds: int
) -> dict[str, float]:
    rates, pct, top = [], [], []
    for seed in range(seeds):
        asked, us = simulate(make(rate, seed), n, drift, seed)
        rates.append(float(asked.mean()))
        warm = int(np.flatnonzero(asked)[:5].max()) + 1 if asked.sum() >= 5 else 0
        p, s = selectivity(asked, us, rate, warm)
        pct.append(p)
        top.append(s)
    return {
        "rate_mean": statistics.fmean(rates),
        "rate_min": min(rates),
        "rate_max": max(rates),
        "worst_abs_error_points": 100 * max(abs(r - rate) for r in rates),
        "asked_percentile": statistics.fmean(pct),
        "asked_in_top_quantile": statistics.fmean(top),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    gates: dict[str, Callable[[float, int], Gate]] = {
        "budget": lambda r, seed: BudgetGate(r, warmup=5),
        "random": lambda r, seed: RandomGate(r, warmup=5, seed=seed),
    }
    rows = []
    for rate in (0.05, 0.10, 0.20):
        for n in (300, 1000):
            for drift in (True, False):
                for name, make in gates.items():
                    m = measure(make, rate, n, drift, args.seeds)
                    rows.append({"gate": name, "rate": rate, "n": n, "drift": drift, **m})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gate.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| gate | target | stream | achieved rate, mean (min-max) | worst error (points) "
        "| asked percentile | asks in top quantile |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        stream = f"{r['n']} {'drifting' if r['drift'] else 'stationary'}"
        lines.append(
            f"| {r['gate']} | {r['rate']:.0%} | {stream} | {r['rate_mean']:.2%} "
            f"({r['rate_min']:.2%}-{r['rate_max']:.2%}) | {r['worst_abs_error_points']:.2f} "
            f"| {r['asked_percentile']:.2f} | {r['asked_in_top_quantile']:.0%} |"
        )
    (RESULTS / "gate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
