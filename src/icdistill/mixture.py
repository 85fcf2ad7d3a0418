"""Weighing a student's own reading against its demonstrations' vote by how relevant the demos are,
learned online from the teacher's answers.

A student has two readings of a classification query: its own zero-shot reading (no demos) and the
demonstrations' vote. Which one to trust depends on how close the nearest demo is to the query: a
demo of the same class at cosine 0.9 is worth copying, the nearest demo of a class the pool has
never seen is not. Every query the teacher answered is a free check of both: the student keeps what
it read of it (its image features and zero-shot distribution) with the teacher's answer, and asks,
leaving that query out (and leaving its whole label out), what the vote of its nearest taught
neighbours would have said and at what similarity. The mixture weights are fitted to those checks by maximum likelihood (EM over a
Gaussian kernel in the similarity), with a small prior that keeps the readings equal where no check
is near.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from icdistill.types import ICDError

# the probability a reading gives the true answer is floored here, so one confident miss is not
# infinitely bad evidence against it
_P_FLOOR = 1e-4
ZERO_SHOT, VOTE = "zero-shot", "vote"


def vote(sims: np.ndarray, answers: Sequence[str], options: Sequence[str], temperature: float) -> np.ndarray:
    """The answers weighted by ``softmax(sims / temperature)``, as a distribution over ``options``."""
    w = np.exp((sims - sims.max()) / temperature)
    w /= w.sum()
    out = np.zeros(len(options))
    index = {o: i for i, o in enumerate(options)}
    for a, wi in zip(answers, w, strict=True):
        if a in index:
            out[index[a]] += wi
    return out


@dataclass
class _Taught:
    """The queries of one option set the teacher answered, as the student read them."""

    features: list[np.ndarray] = field(default_factory=list)  # unit norm
    zero_shot: list[np.ndarray] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    checks: tuple[np.ndarray, np.ndarray] | None = None  # (similarity, p_true (n, 2)), cached
    temperature: float | None = None  # of the zero-shot reading, fitted to the taught answers, cached


# temperatures tried for the zero-shot reading (log-spaced), and the prior's spread on log T
_TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(10.0), 61))
_LOG_T_PRIOR_SD = 1.0


def temper(p: np.ndarray, temperature: float) -> np.ndarray:
    """``p ** (1 / temperature)``, renormalised: sharper below 1, flatter above."""
    logp = np.log(np.maximum(np.asarray(p, dtype=np.float64), 1e-300)) / temperature
    q = np.exp(logp - logp.max())
    return q / q.sum()


class SimilarityMixture:
    """``p(o) = w(s) vote(o) + (1 - w(s)) zero_shot(o)``, ``s`` the nearest shown demo's similarity.

    ``w(s)`` maximises the kernel-weighted likelihood of the teacher's answers over the leave-one-out
    checks of the taught queries: ``sum_i K(s, s_i) log(w p_vote,i + (1 - w) p_zs,i)`` plus a
    Beta prior of ``prior`` pseudo-checks split evenly (EM, ``iterations`` steps from 0.5).
    ``bandwidth`` is the kernel's width in cosine units; ``shots`` and ``temperature`` are those of
    the vote the checks replay. The zero-shot reading enters at a temperature fitted to the taught
    answers too (``zero_shot``).
    """

    def __init__(
        self,
        shots: int = 2,
        temperature: float = 0.05,
        bandwidth: float = 0.1,
        prior: float = 0.5,
        iterations: int = 30,
        max_taught: int = 2000,
    ) -> None:
        if shots < 1 or temperature <= 0 or bandwidth <= 0 or prior <= 0 or iterations < 1 or max_taught < 2:
            raise ICDError(
                "mixture: shots >= 1, temperature, bandwidth and prior > 0, iterations >= 1, max_taught >= 2"
            )
        self.shots = shots
        self.temperature = temperature
        self.bandwidth = bandwidth
        self.prior = prior
        self.iterations = iterations
        self.max_taught = max_taught
        self._taught: dict[tuple[str, ...], _Taught] = {}

    def teach(self, options: Sequence[str], features: np.ndarray, zero_shot: np.ndarray, answer: str) -> None:
        """Remember a query the teacher answered: the student's features and zero-shot distribution."""
        options = tuple(options)
        if answer not in options:
            return
        f = np.asarray(features, dtype=np.float32).ravel()
        f = f / max(float(np.linalg.norm(f)), 1e-12)
        t = self._taught.setdefault(options, _Taught())
        t.features.append(f)
        t.zero_shot.append(np.asarray(zero_shot, dtype=np.float64))
        t.answers.append(answer)
        if len(t.answers) > self.max_taught:
            del t.features[0], t.zero_shot[0], t.answers[0]
        t.checks = None
        t.temperature = None

    def zero_shot_temperature(self, options: Sequence[str]) -> float:
        """The temperature that makes the zero-shot reading best predict the teacher's answers (maximum
        a posteriori, a log-normal prior around 1): a small LM's calibrated option distribution is far
        too flat where it reads right, and should be flattened where it reads wrong."""
        t = self._taught.get(tuple(options))
        if t is None or not t.answers:
            return 1.0
        if t.temperature is None:
            options = tuple(options)
            logp = np.log(np.maximum(np.stack(t.zero_shot), 1e-300))
            y = np.array([options.index(a) for a in t.answers])
            best, best_score = 1.0, -np.inf
            for temp in _TEMPERATURES:
                z = logp / temp
                z = z - z.max(axis=1, keepdims=True)
                ll = (z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).sum()
                score = ll - 0.5 * (np.log(temp) / _LOG_T_PRIOR_SD) ** 2
                if score > best_score:
                    best, best_score = float(temp), float(score)
            t.temperature = best
        return t.temperature

    def zero_shot(self, options: Sequence[str], p: np.ndarray) -> np.ndarray:
        """The zero-shot reading at the fitted temperature."""
        return temper(p, self.zero_shot_temperature(options))

    def taught(self, options: Sequence[str]) -> int:
        t = self._taught.get(tuple(options))
        return 0 if t is None else len(t.answers)

    def checks(self, options: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Checks of the taught queries of ``options``, two per query: leaving it out, the vote of its
        ``shots`` nearest other taught queries, and leaving its whole label out, the vote of the
        nearest of other labels (what the student meets where the pool lacks a class). Each check
        is the nearest voter's similarity and the probability the vote and the query's own zero-shot
        reading gave the teacher's answer, as an (n, 2) array."""
        options = tuple(options)
        t = self._taught.get(options)
        if t is None or len(t.answers) < 2:
            return np.zeros(0), np.zeros((0, 2))
        if t.checks is None:
            feats = np.stack(t.features)
            sims = feats @ feats.T
            np.fill_diagonal(sims, -np.inf)
            labels = np.array(t.answers)
            near: list[float] = []
            p: list[tuple[float, float]] = []
            for i, ans in enumerate(t.answers):
                y = options.index(ans)
                # what the vote of the nearest others said, and what it says where the pool lacks
                # this query's class (only the others of other labels): both at their similarity
                for others in (np.flatnonzero(np.isfinite(sims[i])), np.flatnonzero(labels != ans)):
                    if not len(others):
                        continue
                    top = others[np.argsort(-sims[i, others], kind="stable")[: self.shots]]
                    v = vote(sims[i, top], [t.answers[j] for j in top], options, self.temperature)
                    near.append(float(sims[i, top[0]]))
                    p.append((float(v[y]), float(self.zero_shot(options, t.zero_shot[i])[y])))
            t.checks = (np.array(near), np.maximum(np.array(p).reshape(-1, 2), _P_FLOOR))
        return t.checks

    def vote_weight(self, options: Sequence[str], similarity: float) -> float:
        """``w(s)``: the vote's weight at ``similarity`` (0.5 before any check)."""
        near, p = self.checks(options)
        if not len(near):
            return 0.5
        kern = np.exp(-0.5 * ((near - similarity) / self.bandwidth) ** 2)
        w = 0.5
        for _ in range(self.iterations):
            joint_vote = w * p[:, 0]
            resp = joint_vote / (joint_vote + (1.0 - w) * p[:, 1])
            w = float((self.prior / 2 + kern @ resp) / (self.prior + kern.sum()))
        return w
