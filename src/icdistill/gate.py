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
    with np.errstate(invalid="ignore"):  # all scores -inf give NaN, handled below
        probs = pred.option_probs()
    if len(probs) < 2:
        return token_entropy(pred) if not probs else 0.0
    p = np.array(list(probs.values()), dtype=np.float64)
    if not np.isfinite(p).all():
        return 1.0  # every option scored -inf: nothing is known, the uniform case
    h = float(-(p * np.log(np.clip(p, 1e-300, None))).sum())
    return h / math.log(len(p))


def margin(pred: Prediction) -> float:
    """1 - (p_top1 - p_top2): near 1 when the two best options tie, 0 when one dominates."""
    with np.errstate(invalid="ignore"):
        probs = sorted(pred.option_probs().values(), reverse=True)
    if any(math.isnan(p) for p in probs):
        return 1.0  # every option scored -inf
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


def _nan_is_most_uncertain(u: float) -> float:
    # NaN (e.g. every option scored -inf) means the student knows nothing: the most uncertain case
    return math.inf if math.isnan(u) else u


@dataclass
class ThresholdGate:
    """The paper's rule: ask when the uncertainty exceeds a fixed delta."""

    delta: float

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision:
        uncertainty = _nan_is_most_uncertain(uncertainty)
        if uncertainty > self.delta:
            return GateDecision(True, f"uncertainty {uncertainty:.3f} > delta {self.delta:.3f}", self.delta)
        return GateDecision(False, f"uncertainty {uncertainty:.3f} <= delta {self.delta:.3f}", self.delta)

    def observe(self, uncertainty: float, ctx: GateContext, asked: bool) -> None:
        pass


@dataclass(frozen=True)
class _Pacing:
    """The spending schedule shared by the budget and random gates.

    ``allowance`` = rate * (position + 1) calls. Warm-up: while the pool holds fewer than ``warmup``
    demos every query is asked, up to ``max(warmup, allowance)`` calls. After it: never more than
    ``ahead`` calls over the allowance, and never ``max(slack, slack_per_query * (position + 1))``
    calls behind it (then the next query is asked whatever its uncertainty), so the achieved rate
    stays within about one and a half calls of the target at every point of a stream (0.3-0.4 points
    of rate past 300-400 queries). In between, the gate's own rule decides with an effective rate
    ``rate + behind / horizon`` that leans against the current deviation.
    """

    rate: float
    warmup: int
    horizon: float
    slack: float
    slack_per_query: float = 0.0
    ahead: float = 1.0

    def max_behind(self, ctx: GateContext) -> float:
        return max(self.slack, self.slack_per_query * (ctx.position + 1))

    def forced(self, ctx: GateContext) -> GateDecision | None:
        allowance = self.rate * (ctx.position + 1)
        if ctx.pool_size < self.warmup:
            if ctx.teacher_calls < max(self.warmup, allowance):
                return GateDecision(True, f"warm-up: pool {ctx.pool_size} < {self.warmup}")
            return GateDecision(False, "warm-up budget spent")
        if ctx.teacher_calls + 1 > allowance + self.ahead:
            return GateDecision(False, f"over budget: {ctx.teacher_calls} calls > {allowance:.1f} allowed")
        if allowance - ctx.teacher_calls >= self.max_behind(ctx):
            return GateDecision(True, f"behind budget: {ctx.teacher_calls} calls < {allowance:.1f} allowed")
        return None

    def effective_rate(self, ctx: GateContext) -> float:
        behind = self.rate * (ctx.position + 1) - ctx.teacher_calls
        return float(np.clip(self.rate + behind / self.horizon, 0.0, 1.0))


def _check_rate(rate: float, warmup: int) -> None:
    if not 0.0 < rate <= 1.0:
        raise ICDError(f"budget rate must be in (0, 1], got {rate}")
    if warmup < 0:
        raise ICDError(f"warm-up must be >= 0, got {warmup}")


class BudgetGate:
    """Holds a target teacher-call rate, asking for the most uncertain queries.

    The threshold is the (1 - r) quantile of the last ``window`` uncertainties seen after the warm-up
    (kept per uncertainty kind, ``GateContext.kind``: option entropy and token entropy live on
    different scales), where r is the target rate corrected by how far spending is behind or ahead of
    schedule (``_Pacing``). The window is short so that the threshold follows the uncertainties down
    as the pool grows and the student gets surer; values seen while spending was paused (the pool
    frozen, the student at its least certain) leave it quickly.

    Cold start: the student's uncertainty is uninformative while the pool is empty or tiny (its
    zero-shot label entropy does not separate right from wrong answers), so while the pool holds
    fewer than ``warmup`` demos every query is sent to the teacher, as long as the spend stays within
    ``max(warmup, rate * (t + 1))``. Warm-up uncertainties are not used for the quantile.
    """

    def __init__(
        self,
        rate: float,
        warmup: int = 5,
        horizon: int = 25,
        min_history: int = 20,
        window: int = 80,
        slack: float = 1.4,
        slack_per_query: float = 0.003,
        ahead: float = 1.4,
    ) -> None:
        _check_rate(rate, warmup)
        if horizon < 1 or min_history < 1 or window < min_history or slack < 1.0 or ahead < 1.0:
            raise ICDError(
                "horizon and min_history must be >= 1, window >= min_history, slack and ahead >= 1"
            )
        self.rate = rate
        self.warmup = warmup
        self.horizon = horizon
        self.min_history = min_history
        self.window = window
        self.pacing = _Pacing(rate, warmup, horizon, slack, slack_per_query, ahead)
        self.recent_: dict[str, deque[float]] = {}  # per kind: the last ``window`` values, in arrival order
        self.history_: dict[str, list[float]] = {}  # per kind: the same values, sorted

    def threshold(self, ctx: GateContext) -> float | None:
        history = self.history_.get(ctx.kind, [])
        if len(history) < self.min_history:
            return None
        r = self.pacing.effective_rate(ctx)
        if r >= 1.0:
            return -math.inf
        if r <= 0.0:
            return math.inf
        idx = min(len(history) - 1, int(math.floor((1.0 - r) * len(history))))
        return history[idx]

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision:
        forced = self.pacing.forced(ctx)
        if forced is not None:
            return forced
        u = _nan_is_most_uncertain(uncertainty)
        thr = self.threshold(ctx)
        if thr is None:
            # too little history for a quantile: ask when behind schedule
            ask = ctx.teacher_calls < self.rate * (ctx.position + 1)
            return GateDecision(ask, "calibrating: " + ("behind budget" if ask else "on budget"))
        if u > thr or (u == thr and ctx.teacher_calls < self.rate * (ctx.position + 1)):
            return GateDecision(True, f"uncertainty {u:.3f} > quantile {thr:.3f}", thr)
        return GateDecision(False, f"uncertainty {u:.3f} <= quantile {thr:.3f}", thr)

    def observe(self, uncertainty: float, ctx: GateContext, asked: bool) -> None:
        if ctx.pool_size < self.warmup:
            return
        u = _nan_is_most_uncertain(uncertainty)
        recent = self.recent_.setdefault(ctx.kind, deque())
        history = self.history_.setdefault(ctx.kind, [])
        bisect.insort(history, u)
        recent.append(u)
        if len(recent) > self.window:
            old = recent.popleft()
            del history[bisect.bisect_left(history, old)]


class RandomGate:
    """A baseline: asks at random at the target rate, ignoring uncertainty, paced like ``BudgetGate``
    (same warm-up, same bounds on over- and under-spending, same effective rate).

    Compared with ``BudgetGate`` at the same rate it measures what uncertainty-based gating buys.
    """

    def __init__(
        self,
        rate: float,
        warmup: int = 5,
        seed: int = 0,
        horizon: int = 25,
        slack: float = 1.4,
        slack_per_query: float = 0.003,
        ahead: float = 1.4,
    ) -> None:
        _check_rate(rate, warmup)
        self.rate = rate
        self.warmup = warmup
        self.seed = seed
        self.pacing = _Pacing(rate, warmup, horizon, slack, slack_per_query, ahead)

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision:
        forced = self.pacing.forced(ctx)
        if forced is not None:
            return forced
        r = self.pacing.effective_rate(ctx)
        # seeded by position so a resumed run draws the same coin
        draw = float(np.random.default_rng([self.seed, ctx.position]).random())
        return GateDecision(draw < r, f"random draw {draw:.3f} vs rate {r:.3f}")

    def observe(self, uncertainty: float, ctx: GateContext, asked: bool) -> None:
        pass


class CappedGate:
    """Wraps a gate with a hard cap on teacher calls (and optionally on spent dollars).

    The cost of a call is known only after it, so the dollar cap reserves the dearest call seen so
    far: a call is made only while ``spent + that estimate <= max_cost_usd``. The first call has no
    estimate, and a call dearer than every earlier one can still overshoot by the difference.
    """

    def __init__(self, inner: Gate, max_calls: int | None = None, max_cost_usd: float | None = None) -> None:
        self.inner = inner
        self.max_calls = max_calls
        self.max_cost_usd = max_cost_usd
        self.cost_usd_ = 0.0
        self.dearest_call_usd_ = 0.0

    def add_cost(self, usd: float) -> None:
        self.cost_usd_ += usd
        self.dearest_call_usd_ = max(self.dearest_call_usd_, usd)

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision:
        if self.max_calls is not None and ctx.teacher_calls >= self.max_calls:
            return GateDecision(False, f"cap reached: {ctx.teacher_calls} calls >= {self.max_calls}")
        if self.max_cost_usd is not None and self.cost_usd_ + self.dearest_call_usd_ > self.max_cost_usd:
            return GateDecision(
                False,
                f"cost cap reached: ${self.cost_usd_:.4f} spent + ${self.dearest_call_usd_:.4f} "
                f"for the next call > ${self.max_cost_usd:.4f}",
            )
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
