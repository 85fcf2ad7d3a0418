"""Uncertainty measures of a student's prediction, and the gates that decide when the teacher is asked."""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from icdistill.protocols import Gate
from icdistill.types import GateContext, GateDecision, ICDError, Prediction

# --------------------------------------------------------------------------- uncertainty measures


def label_entropy(pred: Prediction) -> float:
    """Entropy of the softmax over length-normalised option log-likelihoods, divided by log(#options).

    In [0, 1]: 0 = all mass on one option, 1 = uniform. Falls back to token entropy for open answers.
    """
    probs = pred.option_probs()
    if len(probs) < 2:
        return token_entropy(pred) if not probs else 0.0
    p = np.array(list(probs.values()), dtype=np.float64)
    h = float(-(p * np.log(np.clip(p, 1e-300, None))).sum())
    return h / math.log(len(p))


def margin(pred: Prediction) -> float:
    """1 - (p_top1 - p_top2): near 1 when the two best options tie, 0 when one dominates."""
    probs = sorted(pred.option_probs().values(), reverse=True)
    if len(probs) < 2:
        if pred.token_logprobs:
            # generated answers: 1 - probability of the least likely chosen token
            return 1.0 - math.exp(min(pred.token_logprobs))
        return 0.0
    return 1.0 - (probs[0] - probs[1])


def token_entropy(pred: Prediction) -> float:
    """Average per-token entropy of a generated answer (nats); option entropy for classification."""
    if pred.token_entropies:
        return float(np.mean(pred.token_entropies))
    if pred.option_scores:
        return label_entropy(pred)
    return 0.0


UNCERTAINTY: dict[str, Callable[[Prediction], float]] = {
    "entropy": label_entropy,
    "margin": margin,
    "token-entropy": token_entropy,
}


def uncertainty_measure(name: str) -> Callable[[Prediction], float]:
    if name not in UNCERTAINTY:
        raise ICDError(f"unknown uncertainty measure {name!r}; choose one of {', '.join(UNCERTAINTY)}")
    return UNCERTAINTY[name]


# --------------------------------------------------------------------------- gates


class AlwaysGate:
    """Asks the teacher for every query (upper bound on cost; teacher-labelled pool)."""

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision:
        return GateDecision(True, "always")

    def observe(self, uncertainty: float, ctx: GateContext, asked: bool) -> None:
        pass


class NeverGate:
    """Never asks: the student alone (zero-shot, or with a pre-filled pool)."""

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision:
        return GateDecision(False, "never")

    def observe(self, uncertainty: float, ctx: GateContext, asked: bool) -> None:
        pass


@dataclass
class ThresholdGate:
    """The paper's rule: ask when the uncertainty exceeds a fixed delta."""

    delta: float

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision:
        if uncertainty > self.delta:
            return GateDecision(True, f"uncertainty {uncertainty:.3f} > delta {self.delta:.3f}", self.delta)
        return GateDecision(False, f"uncertainty {uncertainty:.3f} <= delta {self.delta:.3f}", self.delta)

    def observe(self, uncertainty: float, ctx: GateContext, asked: bool) -> None:
        pass


class BudgetGate:
    """Holds a target teacher-call rate with an online quantile of past uncertainties.

    The threshold is the (1 - r) quantile of the last ``window`` uncertainties seen after the warm-up, where r is the
    target rate corrected by how far actual spending is behind or ahead of ``rate * t`` (a
    proportional controller with horizon ``horizon`` queries). This follows drifting uncertainties:
    as the pool grows the student becomes surer, and a fixed threshold would stop asking.

    Cold start: the student's uncertainty is uninformative while the pool is empty or tiny (its
    zero-shot label entropy does not separate right from wrong answers), so while the pool holds
    fewer than ``warmup`` demos every query is sent to the teacher, as long as the spend stays within
    ``max(warmup, rate * (t + 1))``. Warm-up uncertainties are not used for the quantile.
    """

    def __init__(
        self, rate: float, warmup: int = 5, horizon: int = 100, min_history: int = 20, window: int = 500
    ) -> None:
        if not 0.0 < rate <= 1.0:
            raise ICDError(f"budget rate must be in (0, 1], got {rate}")
        if warmup < 0 or horizon < 1 or min_history < 1 or window < min_history:
            raise ICDError("warmup must be >= 0, horizon and min_history >= 1, window >= min_history")
        self.rate = rate
        self.warmup = warmup
        self.horizon = horizon
        self.min_history = min_history
        self.window = window
        self.recent_: deque[float] = deque()  # the last ``window`` uncertainties, in arrival order
        self.history_: list[float] = []  # the same values, sorted

    def _effective_rate(self, ctx: GateContext) -> float:
        behind = self.rate * (ctx.position + 1) - ctx.teacher_calls
        return float(np.clip(self.rate + behind / self.horizon, 0.0, 1.0))

    def threshold(self, ctx: GateContext) -> float | None:
        if len(self.history_) < self.min_history:
            return None
        r = self._effective_rate(ctx)
        if r <= 0.0:
            return math.inf
        idx = min(len(self.history_) - 1, int(math.floor((1.0 - r) * len(self.history_))))
        return self.history_[idx]

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision:
        allowance = self.rate * (ctx.position + 1)
        if ctx.pool_size < self.warmup:
            if ctx.teacher_calls < max(self.warmup, allowance):
                return GateDecision(True, f"warm-up: pool {ctx.pool_size} < {self.warmup}")
            return GateDecision(False, "warm-up budget spent")
        if ctx.teacher_calls + 1 > allowance + 1.0:
            return GateDecision(False, f"over budget: {ctx.teacher_calls} calls >= {allowance:.1f} allowed")
        thr = self.threshold(ctx)
        if thr is None:
            # too little history for a quantile: ask when behind schedule
            ask = ctx.teacher_calls < allowance
            return GateDecision(ask, "calibrating: " + ("behind budget" if ask else "on budget"))
        if uncertainty > thr or (uncertainty == thr and ctx.teacher_calls < allowance):
            return GateDecision(True, f"uncertainty {uncertainty:.3f} > quantile {thr:.3f}", thr)
        return GateDecision(False, f"uncertainty {uncertainty:.3f} <= quantile {thr:.3f}", thr)

    def observe(self, uncertainty: float, ctx: GateContext, asked: bool) -> None:
        if ctx.pool_size >= self.warmup and math.isfinite(uncertainty):
            bisect.insort(self.history_, uncertainty)
            self.recent_.append(uncertainty)
            if len(self.recent_) > self.window:
                old = self.recent_.popleft()
                del self.history_[bisect.bisect_left(self.history_, old)]


class RandomGate:
    """A baseline: asks at random at the target rate (same warm-up as ``BudgetGate``), ignoring uncertainty.

    Compared with ``BudgetGate`` at the same rate it measures what uncertainty-based gating buys.
    """

    def __init__(self, rate: float, warmup: int = 5, seed: int = 0) -> None:
        if not 0.0 < rate <= 1.0:
            raise ICDError(f"budget rate must be in (0, 1], got {rate}")
        self.rate = rate
        self.warmup = warmup
        self.seed = seed

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision:
        allowance = self.rate * (ctx.position + 1)
        if ctx.pool_size < self.warmup:
            ask = ctx.teacher_calls < max(self.warmup, allowance)
            return GateDecision(ask, f"warm-up: pool {ctx.pool_size} < {self.warmup}")
        if ctx.teacher_calls >= allowance + 1.0:
            return GateDecision(False, "over budget")
        # seeded by position so a resumed run draws the same coin
        draw = float(np.random.default_rng([self.seed, ctx.position]).random())
        return GateDecision(draw < self.rate, f"random draw {draw:.3f} vs rate {self.rate:.3f}")

    def observe(self, uncertainty: float, ctx: GateContext, asked: bool) -> None:
        pass


class CappedGate:
    """Wraps a gate with a hard cap on teacher calls (and optionally on spent dollars)."""

    def __init__(self, inner: Gate, max_calls: int | None = None, max_cost_usd: float | None = None) -> None:
        self.inner = inner
        self.max_calls = max_calls
        self.max_cost_usd = max_cost_usd
        self.cost_usd_ = 0.0

    def add_cost(self, usd: float) -> None:
        self.cost_usd_ += usd

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision:
        if self.max_calls is not None and ctx.teacher_calls >= self.max_calls:
            return GateDecision(False, f"cap reached: {ctx.teacher_calls} calls >= {self.max_calls}")
        if self.max_cost_usd is not None and self.cost_usd_ >= self.max_cost_usd:
            return GateDecision(False, f"cost cap reached: ${self.cost_usd_:.4f} >= ${self.max_cost_usd:.4f}")
        return self.inner.decide(uncertainty, ctx)

    def observe(self, uncertainty: float, ctx: GateContext, asked: bool) -> None:
        self.inner.observe(uncertainty, ctx, asked)


GATES = ("budget", "threshold", "always", "never", "random")


def make_gate(
    kind: str,
    *,
    budget: float = 0.05,
    delta: float = 0.5,
    warmup: int = 5,
    max_calls: int | None = None,
    max_cost_usd: float | None = None,
    seed: int = 0,
) -> Gate:
    """Build a gate from CLI-level settings (validated here, once)."""
    inner: Gate
    if kind == "budget":
        inner = BudgetGate(budget, warmup=warmup)
    elif kind == "threshold":
        inner = ThresholdGate(delta)
    elif kind == "always":
        inner = AlwaysGate()
    elif kind == "never":
        inner = NeverGate()
    elif kind == "random":
        inner = RandomGate(budget, warmup=warmup, seed=seed)
    else:
        raise ICDError(f"unknown gate {kind!r}; choose one of {', '.join(GATES)}")
    if max_calls is not None or max_cost_usd is not None:
        if max_calls is not None and max_calls < 0:
            raise ICDError("max teacher calls must be >= 0")
        return CappedGate(inner, max_calls, max_cost_usd)
    return inner
