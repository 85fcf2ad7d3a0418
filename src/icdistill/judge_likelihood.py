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
Gaussian kernel estimate (``bandwidth`` in cosine units) mixed with ``prior`` pseudo-samples of the
uniform density on [0, 1], so the ratio stays near 1 until the answers say otherwise. An option the
teacher has never answered gets 1: nothing is known of its images. Every teacher answer that names an
option counts as a labelled image of it, an open question's too (a manifest that asks "what is this?"
of some photos and gives options for others labels both). Where the classes are compact
and apart in the embedder's space (photos of distinct things) the ratio is decisive; where they
overlap (Fashion-MNIST in an ImageNet CNN's space) the two densities overlap and it stays near 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from icdistill.errors import ICDError
from icdistill.teacher import plain_answer

_SQRT_2PI = float(np.sqrt(2.0 * np.pi))


@dataclass
class _Images:
    """The taught images of one option set, and per image the highest cosine to the others of each
    label (``best[i, k]``; -inf where there is none)."""

    features: np.ndarray | None = None  # (capacity, d) unit rows; the first len(labels) are used
    labels: list[int] = field(default_factory=list)
    best: np.ndarray | None = None  # (capacity, n_options)
    samples: tuple[np.ndarray, np.ndarray] | None = None  # (same, other) cosines, cached
    seen: int = 0  # the teacher answers (``SimilarityLikelihood._answers``, by number) looked at so far


class SimilarityLikelihood:
    """The teacher's answered images; ``ratios`` gives each option's likelihood ratio.

    Every teacher answer with an image counts, whatever its question: an option set's images are the
    answers that name one of its options (lower case, no punctuation: an open answer "Rocket." names the option
    "rocket"; answers to another option set with that option too). ``max_ratio`` clips the ratio (and
    its inverse); ``max_taught`` bounds the answers kept, and the images kept per option set (the
    oldest tenth is forgotten at once when it is reached)."""

    def __init__(
        self,
        bandwidth: float = 0.1,
        prior: float = 10.0,
        max_ratio: float = float(np.exp(6.0)),
        max_taught: int = 5000,
    ) -> None:
        if bandwidth <= 0 or prior <= 0 or max_ratio < 1 or max_taught < 10:
            raise ICDError("likelihood: bandwidth and prior > 0, max_ratio >= 1, max_taught >= 10")
        self.bandwidth = bandwidth
        self.prior = prior
        self.max_ratio = max_ratio
        self.max_taught = max_taught
        # the teacher's answers in order: unit features and the normalised answer; the first one kept
        # is answer number ``_first``
        self._answers: list[tuple[np.ndarray, str]] = []
        self._first = 0
        self._images: dict[tuple[str, ...], _Images] = {}

    def teach(self, features: np.ndarray, answer: str) -> None:
        """Remember an image the teacher answered ``answer`` (to any question)."""
        key = plain_answer(answer)
        if not key:
            return
        f = np.asarray(features, dtype=np.float32).ravel()
        self._answers.append((f / max(float(np.linalg.norm(f)), 1e-12), key))
        if len(self._answers) > self.max_taught:
            drop = self.max_taught // 10
            del self._answers[:drop]
            self._first += drop

    def _view(self, options: tuple[str, ...]) -> _Images:
        """The option set's images, brought up to date with the answers taught since it last looked."""
        t = self._images.setdefault(options, _Images())
        index: dict[str, int] = {}
        for i, o in enumerate(options):
            index.setdefault(plain_answer(o), i)
        index.pop("", None)
        for f, key in self._answers[max(0, t.seen - self._first) :]:
            y = index.get(key)
            if y is not None:
                self._add(t, f, y, len(options))
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
        t.best[n] = self._per_label(sims, t.labels, k)
        t.features[n] = f
        t.labels.append(y)
        if len(t.labels) > self.max_taught:
            self._forget_oldest(t, k)
        t.samples = None

    @staticmethod
    def _per_label(sims: np.ndarray, labels: Sequence[int], k: int) -> np.ndarray:
        """The highest of ``sims`` per label (-inf for a label with none)."""
        out = np.full(k, -np.inf)
        if len(labels):
            np.maximum.at(out, np.asarray(labels, dtype=np.int64), sims)
        return out

    def _forget_oldest(self, t: _Images, k: int) -> None:
        assert t.features is not None and t.best is not None
        drop = self.max_taught // 10
        n = len(t.labels) - drop
        t.features[:n] = t.features[drop : drop + n].copy()
        del t.labels[:drop]
        for i in range(n):  # each kept image's best cosines, over the kept images only
            sims = (t.features[:n] @ t.features[i]).astype(np.float64)
            sims[i] = -np.inf
            t.best[i] = self._per_label(sims, t.labels, k)
        t.best[n:] = -np.inf

    def taught(self, options: Sequence[str]) -> int:
        """How many of the answers kept name one of ``options``."""
        return len(self._view(tuple(options)).labels)

    def _samples(self, t: _Images) -> tuple[np.ndarray, np.ndarray]:
        if t.samples is None:
            assert t.best is not None
            n = len(t.labels)
            best = t.best[:n]
            own = np.zeros_like(best, dtype=bool)
            own[np.arange(n), t.labels] = True
            ok = np.isfinite(best)
            t.samples = (best[own & ok], best[~own & ok])
        return t.samples

    def _density(self, samples: np.ndarray, s: np.ndarray) -> np.ndarray:
        """The kernel estimate at each of ``s``, mixed with ``prior`` pseudo-samples of density 1."""
        z = (s[:, None] - samples[None, :]) / self.bandwidth
        kern = np.exp(-0.5 * z * z).sum(axis=1) / (self.bandwidth * _SQRT_2PI)
        return (kern + self.prior) / (len(samples) + self.prior)

    def nearest(self, options: Sequence[str], features: np.ndarray) -> np.ndarray:
        """Per option, the query's highest cosine to a taught image of it (-inf: none taught)."""
        options = tuple(options)
        t = self._view(options)
        if t.features is None or not t.labels:
            return np.full(len(options), -np.inf)
        f = np.asarray(features, dtype=np.float32).ravel()
        f = f / max(float(np.linalg.norm(f)), 1e-12)
        sims = (t.features[: len(t.labels)] @ f).astype(np.float64)
        return self._per_label(sims, t.labels, len(options))

    def ratios(self, options: Sequence[str], features: np.ndarray) -> np.ndarray:
        """Per option, ``f_same(s_o) / f_other(s_o)`` clipped to ``max_ratio``; 1 where the option was
        never answered or fewer than two of the option set's images are taught."""
        options = tuple(options)
        out = np.ones(len(options))
        t = self._view(options)
        if len(t.labels) < 2:
            return out
        s = self.nearest(options, features)
        known = np.isfinite(s)
        same, other = self._samples(t)
        ratio = self._density(same, s[known]) / self._density(other, s[known])
        out[known] = np.clip(ratio, 1.0 / self.max_ratio, self.max_ratio)
        return out
