"""Gates of the evaluation's baselines.

``FixedCountRandomGate`` is ``icd-random-gate``'s gate: the teacher asked at random queries, exactly as
many times as ``icd`` asked it on the same stream, so the two differ only in *which* queries were
sent (a rate-matched random gate made 16/15/15 calls where ``icd`` made 16/14/14).
"""

from __future__ import annotations

import numpy as np

from icdistill.errors import ICDError
from icdistill.types import GateContext, GateDecision


class FixedCountRandomGate:
    """Asks the teacher at exactly ``calls`` of the ``n`` queries of a stream, ignoring uncertainty.

    Warm-up as the budget gate: every query is asked while the pool holds fewer than ``warmup`` demos.
    After it, selection sampling (Knuth's algorithm S): with ``left`` calls to make over ``remaining``
    queries, a query is asked with probability ``left / remaining``, so every set of positions is
    equally likely and the count is exact. The coin is seeded by ``(seed, position)`` and the decision
    depends only on the context: ``decide`` changes nothing and a resumed run decides the same.

    Reasons: ``warm-up: ...`` and ``behind budget: ...`` (every remaining query must be asked) and
    ``cap reached: ...`` (the count is spent) are forced by pacing; ``random draw ...`` is the gate's
    own choice.
    """

    def __init__(self, calls: int, n: int, warmup: int = 5, seed: int = 0) -> None:
        if calls < 0 or n < 0 or warmup < 0:
            raise ICDError(f"a fixed-count gate needs calls, n and warm-up >= 0, got {calls}, {n}, {warmup}")
        self.calls = calls
        self.n = n
        self.warmup = warmup
        self.seed = seed

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision:
        left = self.calls - ctx.teacher_calls
        if left <= 0:
            return GateDecision(
                False, f"cap reached: {ctx.teacher_calls} calls of {self.calls} (matched count)"
            )
        if ctx.pool_size < self.warmup:
            return GateDecision(True, f"warm-up: pool {ctx.pool_size} < {self.warmup}")
        remaining = max(1, self.n - ctx.position)
        if left >= remaining:
            return GateDecision(True, f"behind budget: {left} calls left for {remaining} queries")
        p = left / remaining
        draw = float(np.random.default_rng([self.seed, ctx.position]).random())
        return GateDecision(
            draw < p, f"random draw {draw:.3f} vs {p:.3f} ({left} calls for {remaining} queries)"
        )

    def observe(self, uncertainty: float, ctx: GateContext, asked: bool) -> None:
        pass
