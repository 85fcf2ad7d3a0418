"""Uncertainty measures of a student's prediction, and the gates that decide when the teacher is asked."""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from icdistill.errors import ICDError
from icdistill.protocols import Gate
from icdistill.types import GateContext, GateDecision, Prediction

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


@dataclass
class _KindCounts:
    """Queries of one kind seen by a gate, and how many of them it sent to the teacher."""

    seen: int = 0
    calls: int = 0


@dataclass(frozen=True)
class _Pacing:
    """The spending schedule shared by the budget and random gates, kept per question kind.

    Each kind (``GateContext.kind``: option or open questions) gets its share of the budget:
    ``allowance`` = rate * (queries of that kind seen + 1) calls. Warm-up: while the pool holds fewer
    than ``warmup`` demos of the query's kind, the query is asked as long as that kind's calls stay
    below ``allowance + warmup_ahead`` (the warm-up fits the budget: on a 100-query stream at 5% it
    takes 3 of the 5 calls, and later calls are the gate's own). After it: never more than ``ahead``
    calls over the allowance, and never ``max(slack, slack_per_query * (seen + 1))`` calls behind
    it (then the next query is asked whatever its score), so the achieved rate stays within about
    one and a half calls of the target at every point of a stream. In between, the gate's own rule
    decides with an effective rate ``rate + behind / horizon`` that leans against the deviation.
    """

    rate: float
    warmup: int
    horizon: float
    slack: float
    slack_per_query: float = 0.0
    ahead: float = 1.0
    warmup_ahead: float = 2.0

    def max_behind(self, seen: int) -> float:
        return max(self.slack, self.slack_per_query * (seen + 1))

    def forced(self, counts: _KindCounts, ctx: GateContext) -> GateDecision | None:
        allowance = self.rate * (counts.seen + 1)
        if ctx.pool_size < self.warmup and counts.calls < allowance + self.warmup_ahead:
            return GateDecision(True, f"warm-up: pool {ctx.pool_size} < {self.warmup}")
        if counts.calls + 1 > allowance + self.ahead:
            return GateDecision(False, f"over budget: {counts.calls} calls > {allowance:.1f} allowed")
        if allowance - counts.calls >= self.max_behind(counts.seen):
            return GateDecision(True, f"behind budget: {counts.calls} calls < {allowance:.1f} allowed")
        return None

    def effective_rate(self, counts: _KindCounts) -> float:
        behind = self.rate * (counts.seen + 1) - counts.calls
        return float(np.clip(self.rate + behind / self.horizon, 0.0, 1.0))


FORCED_REASONS = ("warm-up", "over budget", "behind budget", "calibrating", "cap reached", "cost cap")


def is_forced(reason: str) -> bool:
    """Whether a gate decision was forced by pacing or a cap rather than chosen by the gate's score."""
    return reason.startswith(FORCED_REASONS)


def _refund(counts: dict[str, _KindCounts], ctx: GateContext) -> None:
    c = counts.get(ctx.kind)
    if c is not None and c.calls > 0:
        c.calls -= 1


def _check_rate(rate: float, warmup: int) -> None:
    if not 0.0 < rate <= 1.0:
        raise ICDError(f"budget rate must be in (0, 1], got {rate}")
    if warmup < 0:
        raise ICDError(f"warm-up must be >= 0, got {warmup}")


# --------------------------------------------------------------------------- gate scores

# what a budget gate ranks queries by: higher = more worth a teacher call
GATE_SCORES = ("uncertainty", "coverage", "coverage-uncertainty")


def novelty(ctx: GateContext) -> float:
    """1 - the similarity of the query to its nearest pooled demo of the same kind (1: the pool is blind)."""
    s = ctx.signals.get("nearest_demo_similarity")
    return 1.0 if s is None or math.isnan(s) else float(np.clip(1.0 - s, 0.0, 1.0))


def typicality(ctx: GateContext) -> float:
    """How dense the stream is around the query (1 while too few queries were seen to say)."""
    t = ctx.signals.get("typicality")
    return 1.0 if t is None or math.isnan(t) else float(np.clip(t, 0.0, 1.0))


def gate_score(kind: str, uncertainty: float, ctx: GateContext) -> float:
    """``uncertainty``: the student's; ``coverage``: novelty x typicality, queries the pool cannot
    answer from a near demo and that the stream keeps meeting (after Hacohen et al., 2022: at tiny
    budgets typical examples beat uncertain ones); ``coverage-uncertainty``: that times
    ``0.5 + uncertainty``."""
    u = _nan_is_most_uncertain(uncertainty)
    if kind == "uncertainty":
        return u
    cover = novelty(ctx) * typicality(ctx)
    if kind == "coverage":
        return cover
    return cover * (0.5 + min(u, 1e6))


class BudgetGate:
    """Holds a target teacher-call rate, asking for the queries with the highest score.

    The score (``score``, see ``gate_score``) is the student's uncertainty, or how blind the pool is
    around the query and how typical the query is of the stream (``coverage``). The threshold is the
    (1 - r) quantile of the last ``window`` scores seen after the warm-up (kept per kind,
    ``GateContext.kind``: option entropy and token entropy live on different scales), where r is the
    target rate corrected by how far that kind's spending is behind or ahead of schedule
    (``_Pacing``). The window is short so that the threshold follows the scores down as the pool
    grows and the student gets surer.

    Cold start: the student's uncertainty is uninformative while the pool is empty or tiny (its
    zero-shot label entropy does not separate right from wrong answers), so while the pool holds
    fewer than ``warmup`` demos of the query's kind, queries are sent to the teacher within the
    warm-up's share of the budget. Warm-up scores are not used for the quantile.
    """

    def __init__(
        self,
        rate: float,
        warmup: int = 3,
        horizon: int = 25,
        min_history: int = 20,
        window: int = 80,
        slack: float = 1.4,
        slack_per_query: float = 0.003,
        ahead: float = 1.4,
        score: str = "uncertainty",
        warmup_ahead: float = 2.0,
    ) -> None:
        _check_rate(rate, warmup)
        if horizon < 1 or min_history < 1 or window < min_history or slack < 1.0 or ahead < 1.0:
            raise ICDError(
                "horizon and min_history must be >= 1, window >= min_history, slack and ahead >= 1"
            )
        if score not in GATE_SCORES:
            raise ICDError(f"unknown gate score {score!r}; choose one of {', '.join(GATE_SCORES)}")
        self.rate = rate
        self.warmup = warmup
        self.horizon = horizon
        self.min_history = min_history
        self.window = window
        self.score = score
        self.pacing = _Pacing(rate, warmup, horizon, slack, slack_per_query, ahead, warmup_ahead)
        self.counts_: dict[str, _KindCounts] = {}
        self.recent_: dict[str, deque[float]] = {}  # per kind: the last ``window`` scores, in arrival order
        self.history_: dict[str, list[float]] = {}  # per kind: the same values, sorted

    def _counts(self, ctx: GateContext) -> _KindCounts:
        return self.counts_.get(ctx.kind, _KindCounts())

    def threshold(self, ctx: GateContext) -> float | None:
        history = self.history_.get(ctx.kind, [])
        if len(history) < self.min_history:
            return None
        r = self.pacing.effective_rate(self._counts(ctx))
        if r >= 1.0:
            return -math.inf
        if r <= 0.0:
            return math.inf
        idx = min(len(history) - 1, int(math.floor((1.0 - r) * len(history))))
        return history[idx]

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision:
        counts = self._counts(ctx)
        g = gate_score(self.score, uncertainty, ctx)
        forced = self.pacing.forced(counts, ctx)
        if forced is not None:
            return replace(forced, score=g)
        thr = self.threshold(ctx)
        name = "uncertainty" if self.score == "uncertainty" else f"{self.score} score"
        if thr is None:
            # too little history for a quantile: ask when behind schedule
            ask = counts.calls < self.rate * (counts.seen + 1)
            return GateDecision(ask, "calibrating: " + ("behind budget" if ask else "on budget"), score=g)
        if g > thr or (g == thr and counts.calls < self.rate * (counts.seen + 1)):
            return GateDecision(True, f"{name} {g:.3f} > quantile {thr:.3f}", thr, g)
        return GateDecision(False, f"{name} {g:.3f} <= quantile {thr:.3f}", thr, g)

    def observe(self, uncertainty: float, ctx: GateContext, asked: bool) -> None:
        counts = self.counts_.setdefault(ctx.kind, _KindCounts())
        counts.seen += 1
        counts.calls += int(asked)
        if ctx.pool_size < self.warmup:
            return
        g = gate_score(self.score, uncertainty, ctx)
        recent = self.recent_.setdefault(ctx.kind, deque())
        history = self.history_.setdefault(ctx.kind, [])
        bisect.insort(history, g)
        recent.append(g)
        if len(recent) > self.window:
            old = recent.popleft()
            del history[bisect.bisect_left(history, old)]

    def refund(self, ctx: GateContext) -> None:
        """A call ``observe`` counted was not made after all (refused, or bought by another worker):
        the log then says not asked, which is what a resumed run replays."""
        _refund(self.counts_, ctx)


class RandomGate:
    """A baseline: asks at random at the target rate, ignoring uncertainty, paced like ``BudgetGate``
    (same warm-up, same bounds on over- and under-spending, same effective rate, per kind).

    Compared with ``BudgetGate`` at the same rate it measures what uncertainty-based gating buys.
    """

    def __init__(
        self,
        rate: float,
        warmup: int = 3,
        seed: int = 0,
        horizon: int = 25,
        slack: float = 1.4,
        slack_per_query: float = 0.003,
        ahead: float = 1.4,
        warmup_ahead: float = 2.0,
    ) -> None:
        _check_rate(rate, warmup)
        self.rate = rate
        self.warmup = warmup
        self.seed = seed
        self.pacing = _Pacing(rate, warmup, horizon, slack, slack_per_query, ahead, warmup_ahead)
        self.counts_: dict[str, _KindCounts] = {}

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision:
        counts = self.counts_.get(ctx.kind, _KindCounts())
        forced = self.pacing.forced(counts, ctx)
        if forced is not None:
            return forced
        r = self.pacing.effective_rate(counts)
        # seeded by position so a resumed run draws the same coin
        draw = float(np.random.default_rng([self.seed, ctx.position]).random())
        return GateDecision(draw < r, f"random draw {draw:.3f} vs rate {r:.3f}")

    def observe(self, uncertainty: float, ctx: GateContext, asked: bool) -> None:
        counts = self.counts_.setdefault(ctx.kind, _KindCounts())
        counts.seen += 1
        counts.calls += int(asked)

    def refund(self, ctx: GateContext) -> None:
        _refund(self.counts_, ctx)


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

    def refund(self, ctx: GateContext) -> None:
        refund = getattr(self.inner, "refund", None)
        if refund is not None:
            refund(ctx)


GATES = ("budget", "threshold", "always", "never", "random")


def make_gate(
    kind: str,
    *,
    budget: float = 0.05,
    delta: float = 0.5,
    warmup: int = 3,
    score: str = "uncertainty",
    max_calls: int | None = None,
    max_cost_usd: float | None = None,
    seed: int = 0,
) -> Gate:
    """Build a gate from CLI-level settings (validated here, once)."""
    inner: Gate
    if kind == "budget":
        inner = BudgetGate(budget, warmup=warmup, score=score)
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
    return with_caps(inner, max_calls, max_cost_usd)


def with_caps(inner: Gate, max_calls: int | None = None, max_cost_usd: float | None = None) -> Gate:
    """``inner`` under the hard caps on teacher calls and dollars, when any is set."""
    if max_calls is not None or max_cost_usd is not None:
        if max_calls is not None and max_calls < 0:
            raise ICDError("max teacher calls must be >= 0")
        return CappedGate(inner, max_calls, max_cost_usd)
    return inner
