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

from icdistill.errors import ICDError

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
    """The queries of one option set the teacher answered, as the student read them, and each one's
    check neighbours, kept up to date one taught query at a time (a teach costs O(n), not O(n^2))."""

    features: np.ndarray | None = None  # (capacity, d) unit rows; the first len(answers) are used
    zero_shot: list[np.ndarray] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    # per taught query, its ``shots`` nearest others (leave-one-out) and nearest others of other
    # labels (leave-label-out), nearest first, ties to the earlier taught: index (-1: none), cosine
    loo: tuple[np.ndarray, np.ndarray] | None = None
    llo: tuple[np.ndarray, np.ndarray] | None = None
    checks: tuple[np.ndarray, np.ndarray] | None = None  # (similarity, p_true (n, 2)), cached
    label_left_out: np.ndarray | None = None  # per check: leave-label-out (True) or leave-one-out, cached
    temperature: float | None = None  # of the zero-shot reading, fitted to the taught answers, cached


def _nearest(sims: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` candidates of highest similarity, nearest first (ties: lower index), padded."""
    top = candidates[np.argsort(-sims[candidates], kind="stable")[:k]]
    idx = np.full(k, -1, dtype=np.int64)
    sim = np.full(k, -np.inf)
    idx[: len(top)] = top
    sim[: len(top)] = sims[top]
    return idx, sim


def _offer(nbrs: tuple[np.ndarray, np.ndarray], sims: np.ndarray, new: int, rows: np.ndarray) -> None:
    """Offer taught query ``new`` (at ``sims`` to each row) as a neighbour of ``rows``: it enters a
    row's list where it is nearer than that row's last (on a tie the earlier taught stays first)."""
    idx, sim = nbrs
    for r in rows[sims[rows] > sim[rows, -1]]:
        pos = int((sim[r] >= sims[r]).sum())
        idx[r, pos + 1 :] = idx[r, pos:-1].copy()
        sim[r, pos + 1 :] = sim[r, pos:-1].copy()
        idx[r, pos], sim[r, pos] = new, sims[r]


# temperatures tried for the zero-shot reading (log-spaced), and the prior's spread on log T
_TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(10.0), 61))
_LOG_T_PRIOR_SD = 1.0


def temper(p: np.ndarray, temperature: float) -> np.ndarray:
    """``p ** (1 / temperature)``, renormalised: sharper below 1, flatter above."""
    logp = np.log(np.maximum(np.asarray(p, dtype=np.float64), 1e-300)) / temperature
    q = np.exp(logp - logp.max())
    return q / q.sum()


def fit_temperature(
    p: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, center: float = 1.0
) -> float:
    """The temperature at which the rows of ``p`` (n, options) best predict the answers ``y`` (maximum
    a posteriori over a log-spaced grid, a log-normal prior around ``center``; ``weights``: per row,
    e.g. a kernel): a small LM's calibrated option distribution is far too flat where it reads right,
    and should be flattened where it reads wrong."""
    logp = np.log(np.maximum(np.asarray(p, dtype=np.float64), 1e-300))
    y = np.asarray(y)
    k = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    best, best_score = 1.0, -np.inf
    for temp in _TEMPERATURES:
        z = logp / temp
        z = z - z.max(axis=1, keepdims=True)
        ll = ((z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))) * k).sum()
        score = ll - 0.5 * (np.log(temp / center) / _LOG_T_PRIOR_SD) ** 2
        if score > best_score:
            best, best_score = float(temp), float(score)
    return best


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
        prior: float = 1.0,
        iterations: int = 30,
        max_taught: int = 5000,
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
        n, k = len(t.answers), self.shots
        if t.features is None or t.loo is None or t.llo is None:
            t.features = np.zeros((16, f.size), dtype=np.float32)
            t.loo = (np.zeros((0, k), dtype=np.int64), np.zeros((0, k)))
            t.llo = (np.zeros((0, k), dtype=np.int64), np.zeros((0, k)))
        if n == len(t.features):
            t.features = np.concatenate([t.features, np.zeros_like(t.features)])
        sims = (t.features[:n] @ f).astype(np.float64)
        other = np.flatnonzero(np.array([a != answer for a in t.answers], dtype=bool))
        _offer(t.loo, sims, n, np.arange(n))
        _offer(t.llo, sims, n, other)
        loo, llo = _nearest(sims, np.arange(n), k), _nearest(sims, other, k)
        t.loo = (np.vstack([t.loo[0], loo[0]]), np.vstack([t.loo[1], loo[1]]))
        t.llo = (np.vstack([t.llo[0], llo[0]]), np.vstack([t.llo[1], llo[1]]))
        t.features[n] = f
        t.zero_shot.append(np.asarray(zero_shot, dtype=np.float64))
        t.answers.append(answer)
        if len(t.answers) > self.max_taught:
            self._forget_first(t)
        t.checks = None
        t.temperature = None

    def _forget_first(self, t: _Taught) -> None:
        """Drop the oldest taught query; the rows that had it as a neighbour look again."""
        assert t.features is not None and t.loo is not None and t.llo is not None
        n = len(t.answers)
        t.features[: n - 1] = t.features[1:n].copy()
        del t.zero_shot[0], t.answers[0]
        n -= 1
        labels = np.array(t.answers)
        lists = []
        for (idx, sim), same_label_too in ((t.loo, True), (t.llo, False)):
            idx, sim = idx[1:].copy(), sim[1:].copy()
            lost = np.flatnonzero((idx == 0).any(axis=1))
            idx[idx > 0] -= 1
            for r in lost:
                sims = (t.features[:n] @ t.features[r]).astype(np.float64)
                cand = (
                    np.flatnonzero(np.arange(n) != r)
                    if same_label_too
                    else np.flatnonzero(labels != labels[r])
                )
                idx[r], sim[r] = _nearest(sims, cand, self.shots)
            lists.append((idx, sim))
        t.loo, t.llo = lists

    def with_shots(self, shots: int) -> SimilarityMixture:
        """The same mixture checking a vote of ``shots`` neighbours, re-taught what this one was."""
        twin = SimilarityMixture(
            shots, self.temperature, self.bandwidth, self.prior, self.iterations, self.max_taught
        )
        for options, t in self._taught.items():
            assert t.features is not None or not t.answers
            for i, answer in enumerate(t.answers):
                twin.teach(options, t.features[i], t.zero_shot[i], answer)  # type: ignore[index]
        return twin

    def zero_shot_temperature(self, options: Sequence[str]) -> float:
        """The temperature that makes the zero-shot reading best predict the teacher's answers (maximum
        a posteriori, a log-normal prior around 1): a small LM's calibrated option distribution is far
        too flat where it reads right, and should be flattened where it reads wrong."""
        t = self._taught.get(tuple(options))
        if t is None or not t.answers:
            return 1.0
        if t.temperature is None:
            options = tuple(options)
            y = np.array([options.index(a) for a in t.answers])
            t.temperature = fit_temperature(np.stack(t.zero_shot), y)
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
            assert t.loo is not None and t.llo is not None
            n = len(t.answers)
            y = np.array([options.index(a) for a in t.answers])
            # each one's zero-shot reading at the fitted temperature (``temper``, row by row)
            logp = np.log(np.maximum(np.stack(t.zero_shot), 1e-300)) / self.zero_shot_temperature(options)
            q = np.exp(logp - logp.max(axis=1, keepdims=True))
            zs = (q / q.sum(axis=1, keepdims=True))[np.arange(n), y]
            near, p, valid = [], [], []
            for idx, sim in (t.loo, t.llo):
                # the vote of the row's neighbours (``vote``), for the row's own answer
                ok = idx >= 0
                top = np.where(ok[:, :1], sim[:, :1], 0.0)
                w = np.where(ok, np.exp((np.where(ok, sim, top) - top) / self.temperature), 0.0)
                w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
                p_vote = (w * ((y[np.where(ok, idx, 0)] == y[:, None]) & ok)).sum(axis=1)
                near.append(sim[:, 0])
                p.append(np.stack([p_vote, zs], axis=1))
                valid.append(ok[:, 0])
            # two checks per query, in order (leave-one-out, leave-label-out), those that exist
            keep = np.stack(valid, axis=1).ravel()
            near_all = np.stack(near, axis=1).ravel()[keep]
            p_all = np.stack(p, axis=1).reshape(-1, 2)[keep]
            t.checks = (near_all, np.maximum(p_all, _P_FLOOR))
            t.label_left_out = np.stack([np.zeros(n, bool), np.ones(n, bool)], axis=1).ravel()[keep]
        return t.checks

    def label_left_out(self, options: Sequence[str]) -> np.ndarray:
        """Per check of ``checks(options)``, in order: whether it left the query's label out."""
        self.checks(options)
        t = self._taught.get(tuple(options))
        if t is None or t.label_left_out is None:
            return np.zeros(0, dtype=bool)
        return t.label_left_out

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
