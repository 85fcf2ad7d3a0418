"""How far a query is from each label's taught images, as evidence for or against that label.

The vote of the nearest demos says which label is near; it cannot say that a label is *far*. A query
whose nearest taught image of a label is at cosine 0.2, where the teacher's own answers show that
images of one label sit at 0.7 and more from each other, is very probably not of that label, even
when that label is the only one pooled. Per option ``o`` that the teacher has answered, with ``s_o``
the query's highest cosine to a taught image of ``o``, the judge multiplies its answer by

    f_same(s_o) / f_other(s_o)

the density of that cosine among taught images of the *same* label over its density among taught
images of *other* labels (naive Bayes over the labels' nearest cosines), both read from the teacher's
answers themselves: for every taught image, its highest cosine to the other taught images of its own
label (a ``same`` sample) and to those of each other label (an ``other`` sample). Each density is a
Gaussian kernel estimate (``bandwidth`` in cosine units; an image's other-label samples share one
unit of weight, so each image weighs as much in both densities), mixed with the uniform density on
[0, 1] in the same share on both sides, ``prior / (images + prior)``: the ratio is 1 where neither
density has samples near, and stays near 1 until the answers say otherwise. An option the
teacher has never answered gets 1: nothing is known of its images. Every teacher answer that names an
option counts as a labelled image of it, an open question's too (a manifest that asks "what is this?"
of some photos and gives options for others labels both). Where the classes are compact
and apart in the embedder's space (photos of distinct things) the ratio is decisive; where they
overlap (Fashion-MNIST in an ImageNet CNN's space) the two densities overlap and it stays near 1.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from icdistill.errors import ICDError
from icdistill.teacher import plain_answer

_SQRT_2PI = float(np.sqrt(2.0 * np.pi))


@dataclass
class _Images:
    """The taught images that name one of a set of labels, and per image the highest cosine to the
    others of each label (``best[i, k]``; -inf where there is none)."""

    features: np.ndarray | None = None  # (capacity, d) unit rows; the first len(labels) are used
    labels: list[int] = field(default_factory=list)
    best: np.ndarray | None = None  # (capacity, n_labels)
    # the densities' samples: same-label cosines, other-label cosines and their weights; cached
    samples: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    first: int = 0  # the number (in ``SimilarityLikelihood``'s answers) of the first answer looked at
    seen: int = 0  # and of the next one to look at


def label_names(options: Sequence[str]) -> list[str | None]:
    """Per option, the name its answers are matched by (lower case, no punctuation); None where two
    options share a name (an answer could not say which it names)."""
    names = [plain_answer(o) or None for o in options]
    return [n if n is not None and names.count(n) == 1 else None for n in names]


class SimilarityLikelihood:
    """The teacher's answered images; ``ratios`` gives each option's likelihood ratio.

    Every teacher answer with an image counts, whatever its question: an option set's images are the
    answers that name one of its options (lower case, no punctuation: an open answer "Rocket." names
    the option "rocket"; answers to another option set with that option too). What a set of labels
    holds depends only on the answers kept, so a resumed run (its answers replayed) reads the same.
    ``max_ratio`` clips the ratio (and its inverse); ``max_taught`` bounds the answers kept (the oldest
    tenth is forgotten at once when it is reached; a set of labels that held one of them is rebuilt
    from those kept); ``max_sets`` bounds the sets of labels kept (the least recently asked goes, to be
    rebuilt when asked again)."""

    def __init__(
        self,
        bandwidth: float = 0.1,
        prior: float = 30.0,
        max_ratio: float = float(np.exp(6.0)),
        max_taught: int = 5000,
        max_sets: int = 64,
    ) -> None:
        if bandwidth <= 0 or prior <= 0 or max_ratio < 1 or max_taught < 10 or max_sets < 1:
            raise ICDError(
                "likelihood: bandwidth and prior > 0, max_ratio >= 1, max_taught >= 10, max_sets >= 1"
            )
        self.bandwidth = bandwidth
        self.prior = prior
        self.max_ratio = max_ratio
        self.max_taught = max_taught
        self.max_sets = max_sets
        # the teacher's answers in order: unit features and the answer's name; the first one kept is
        # answer number ``_first``
        self._answers: list[tuple[np.ndarray, str]] = []
        self._first = 0
        self._sets: OrderedDict[tuple[str, ...], _Images] = OrderedDict()

    def teach(self, features: np.ndarray, answer: str) -> None:
        """Remember an image the teacher answered ``answer`` (to any question)."""
        name = plain_answer(answer)
        if not name:
            return
        f = np.asarray(features, dtype=np.float32).ravel()
        self._answers.append((f / max(float(np.linalg.norm(f)), 1e-12), name))
        if len(self._answers) > self.max_taught:
            drop = self.max_taught // 10
            del self._answers[:drop]
            self._first += drop

    def _view(self, names: tuple[str, ...]) -> _Images:
        """The images of the labels ``names`` (sorted), brought up to date with the answers kept."""
        t = self._sets.get(names)
        if t is None or t.first < self._first:  # new, or it holds answers forgotten since: rebuild
            t = _Images(first=self._first, seen=self._first)
        self._sets[names] = t
        self._sets.move_to_end(names)
        while len(self._sets) > self.max_sets:
            self._sets.popitem(last=False)
        index = {n: i for i, n in enumerate(names)}
        for f, name in self._answers[t.seen - self._first :]:
            y = index.get(name)
            if y is not None:
                self._add(t, f, y, len(names))
        t.seen = self._first + len(self._answers)
        return t

    def _add(self, t: _Images, f: np.ndarray, y: int, k: int) -> None:
        if t.features is None or t.best is None:
            t.features = np.zeros((16, f.size), dtype=np.float32)
            t.best = np.full((16, k), -np.inf)
        n = len(t.labels)
        if n == len(t.features):
            t.features = np.concatenate([t.features, np.zeros_like(t.features)])
            t.best = np.concatenate([t.best, np.full_like(t.best, -np.inf)])
        sims = (t.features[:n] @ f).astype(np.float64)
        t.best[:n, y] = np.maximum(t.best[:n, y], sims)
        t.best[n] = -np.inf
        if n:
            np.maximum.at(t.best[n], np.asarray(t.labels, dtype=np.int64), sims)
        t.features[n] = f
        t.labels.append(y)
        t.samples = None

    @staticmethod
    def _names(options: Sequence[str]) -> tuple[tuple[str, ...], list[int | None]]:
        """The sorted label names of ``options`` and, per option, its index among them (None: shared)."""
        per = label_names(options)
        names = tuple(sorted({n for n in per if n is not None}))
        return names, [None if n is None else names.index(n) for n in per]

    def taught(self, options: Sequence[str]) -> int:
        """How many of the answers kept name one of ``options``."""
        return len(self._view(self._names(options)[0]).labels)

    def _samples(self, t: _Images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if t.samples is None:
            assert t.best is not None
            n = len(t.labels)
            best = t.best[:n]
            own = np.zeros_like(best, dtype=bool)
            own[np.arange(n), t.labels] = True
            ok = np.isfinite(best)
            other = ~own & ok
            # an image's other-label samples share one unit of weight
            weight = np.broadcast_to(1.0 / np.maximum(other.sum(axis=1, keepdims=True), 1), best.shape)
            t.samples = (best[own & ok], best[other], weight[other])
        return t.samples

    def _density(self, samples: np.ndarray, weights: np.ndarray, s: np.ndarray, share: float) -> np.ndarray:
        """The weighted kernel estimate at each of ``s``, mixed with the uniform density on [0, 1] in
        ``share`` (all of it where there is no sample)."""
        if not len(samples):
            return np.ones(len(s))
        z = (s[:, None] - samples[None, :]) / self.bandwidth
        kern = (np.exp(-0.5 * z * z) * weights).sum(axis=1) / (weights.sum() * self.bandwidth * _SQRT_2PI)
        return (1.0 - share) * kern + share

    def nearest(self, options: Sequence[str], features: np.ndarray) -> np.ndarray:
        """Per option, the query's highest cosine to a taught image of it (-inf: none taught, or the
        option shares its name with another)."""
        names, where = self._names(options)
        return self._nearest(self._view(names), where, features)

    @staticmethod
    def _nearest(t: _Images, where: list[int | None], features: np.ndarray) -> np.ndarray:
        out = np.full(len(where), -np.inf)
        if t.features is None or not t.labels:
            return out
        f = np.asarray(features, dtype=np.float32).ravel()
        f = f / max(float(np.linalg.norm(f)), 1e-12)
        sims = (t.features[: len(t.labels)] @ f).astype(np.float64)
        per = np.full(int(max(t.labels)) + 1, -np.inf)
        np.maximum.at(per, np.asarray(t.labels, dtype=np.int64), sims)
        for j, i in enumerate(where):
            if i is not None and i < len(per):
                out[j] = per[i]
        return out

    def ratios(self, options: Sequence[str], features: np.ndarray) -> np.ndarray:
        """Per option, ``f_same(s_o) / f_other(s_o)`` clipped to ``max_ratio``; 1 where the option was
        never answered, shares its name with another, or fewer than two images are taught."""
        names, where = self._names(options)
        t = self._view(names)
        out = np.ones(len(where))
        if len(t.labels) < 2:
            return out
        s = self._nearest(t, where, features)
        known = np.isfinite(s)
        same, other, weights = self._samples(t)
        share = self.prior / (len(t.labels) + self.prior)
        num = self._density(same, np.ones(len(same)), s[known], share)
        ratio = num / self._density(other, weights, s[known], share)
        out[known] = np.clip(ratio, 1.0 / self.max_ratio, self.max_ratio)
        return out
