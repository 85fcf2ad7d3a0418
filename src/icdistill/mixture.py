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
    check_weights: np.ndarray | None = None  # how much each check counts, cached with them
    # the zero-shot reading's confusion: counts[c, y] = taught queries it read as c whose answer was y
    confusion: np.ndarray | None = None


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


# pseudo-counts of the prior on each row of the zero-shot reading's confusion
_CONFUSION_PRIOR = 4.0


def _unseen_weights(answers: Sequence[str], k: int) -> np.ndarray:
    """Per taught query, the weight of its leave-label-out check (see ``check_weights``)."""
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    once = sum(1 for a in answers if counts[a] == 1)
    # Good-Turing, but never below the share of the ``k`` options no one has taught yet
    unseen = max((once + 1.0) / (len(answers) + 2.0), (k - len(counts)) / k)
    return np.array([0.0 if counts[a] == 1 else unseen for a in answers])


def _calibrated(counts: np.ndarray, read: np.ndarray) -> np.ndarray:
    """``P(answer = y | the zero-shot reading's top option is c)`` for each ``c`` in ``read``: the
    confusion counts smoothed toward the reading's overall accuracy (Dirichlet, ``_CONFUSION_PRIOR``
    pseudo-counts; Beta(1, 1) on the accuracy). ``counts`` may be per row (leave-one-out)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim == 2:
        counts = np.broadcast_to(counts, (len(read), *counts.shape))
    k = counts.shape[-1]
    hits = np.trace(counts, axis1=1, axis2=2)
    total = counts.sum(axis=(1, 2))
    accuracy = (hits + 1.0) / (total + 2.0)
    prior = np.repeat(((1.0 - accuracy) / max(k - 1, 1))[:, None], k, axis=1)
    prior[np.arange(len(read)), read] = accuracy if k > 1 else 1.0
    row = counts[np.arange(len(read)), read]
    return (row + _CONFUSION_PRIOR * prior) / (row.sum(axis=1, keepdims=True) + _CONFUSION_PRIOR)


class SimilarityMixture:
    """``p(o) ∝ vote_s(o) zero_shot(o)``: the two readings as independent evidence (``combine``), the
    vote calibrated by ``rho(s)``, how often a vote of demos at the nearest demo's similarity ``s``
    has been right, and the zero-shot reading by what its top option has meant so far.

    ``rho(s)`` is the kernel-weighted share of checks of the taught queries (leave-one-out, and
    leave-label-out weighted by how often a label is missing) at which the vote gave the teacher's
    answer, with a Beta prior of ``prior`` pseudo-checks at 0.5 (``vote_weight``).
    ``bandwidth`` is the kernel's width in cosine units; ``shots`` and ``temperature`` are those of
    the vote the checks replay. The zero-shot reading enters as what its top option has meant so far
    (``zero_shot``): a small LM's option distribution is nearly flat where it reads right and
    confident where it reads wrong, so its probabilities are not comparable with the vote's.
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
        t.confusion = None

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
                cand = np.flatnonzero(np.arange(n) != r) if same_label_too else np.flatnonzero(labels != labels[r])
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

    def _confusion(self, options: tuple[str, ...], t: _Taught) -> np.ndarray:
        if t.confusion is None:
            k = len(options)
            counts = np.zeros((k, k))
            for zs, a in zip(t.zero_shot, t.answers, strict=True):
                counts[int(np.argmax(zs)), options.index(a)] += 1
            t.confusion = counts
        return t.confusion

    def zero_shot(self, options: Sequence[str], p: np.ndarray) -> np.ndarray:
        """The zero-shot reading as a distribution over the answer: ``P(y | its top option)`` from the
        taught queries' confusion, smoothed toward its accuracy so far (uniform accuracy 1/2 before
        any). What matters is whether its top option has been right, not how sure it sounded."""
        options = tuple(options)
        t = self._taught.get(options)
        k = len(options)
        counts = self._confusion(options, t) if t is not None and t.answers else np.zeros((k, k))
        return _calibrated(counts, np.array([int(np.argmax(p))]))[0]

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
            # each one's zero-shot reading, calibrated on the confusion of the others (leave-one-out)
            read = np.array([int(np.argmax(z)) for z in t.zero_shot])
            own = np.zeros((n, len(options), len(options)))
            own[np.arange(n), read, y] = 1.0
            zs = _calibrated(self._confusion(options, t)[None] - own, read)[np.arange(n), y]
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
            t.check_weights = np.stack([np.ones(n), _unseen_weights(t.answers, len(options))], axis=1).ravel()[keep]
        return t.checks

    def check_weights(self, options: Sequence[str]) -> np.ndarray:
        """How much each check of ``checks`` counts: 1 for a leave-one-out check; for a leave-label-out
        check, an estimate of how often a new query's label is one the pool lacks (Good-Turing,
        ``(labels taught once + 1) / (taught + 2)``, or the share of options never taught if that is
        larger), and 0 for a label taught once, whose
        leave-one-out check already is that case. Without it, one always-wrong leave-label-out check
        per taught query would pull the vote's weight down wherever classes look alike, long after
        every class is pooled."""
        self.checks(options)
        t = self._taught.get(tuple(options))
        return np.zeros(0) if t is None or t.check_weights is None else t.check_weights

    def vote_weight(self, options: Sequence[str], similarity: float) -> float:
        """``rho(s)``: how often the vote of demos this near has given the teacher's answer, from the
        checks (kernel-weighted mean of the probability the vote gave the answer, each check weighted
        by ``check_weights``, a Beta prior of ``prior`` pseudo-checks at 0.5)."""
        near, p = self.checks(options)
        if not len(near):
            return 0.5
        kern = np.exp(-0.5 * ((near - similarity) / self.bandwidth) ** 2) * self.check_weights(options)
        return float((self.prior / 2 + kern @ p[:, 0]) / (self.prior + kern.sum()))

    def combine(self, options: Sequence[str], vote: np.ndarray, zero_shot: np.ndarray, similarity: float) -> np.ndarray:
        """The answer's distribution from both readings as independent evidence (naive Bayes over a
        uniform prior): the vote, right with probability ``rho(s)`` (``vote_weight``), otherwise any
        other option alike; times the zero-shot reading calibrated on its confusion (``zero_shot``).
        Each reading counts for how often it has been right where it stands now, not for how sure
        it sounds: a one-hot vote of far demos of another class counts little, a flat zero-shot
        reading that has been right counts much."""
        k = len(options)
        rho = self.vote_weight(options, similarity)
        vote = np.asarray(vote, dtype=np.float64)
        vote_cal = rho * vote + (1.0 - rho) * (1.0 - vote) / max(k - 1, 1)
        joint = vote_cal * self.zero_shot(options, zero_shot)
        return joint / joint.sum()
