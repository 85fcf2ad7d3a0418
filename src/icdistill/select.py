"""Demonstration selectors: random, image-image, text-text, and the staged cross-modal retrieval."""

from __future__ import annotations

import numpy as np

from icdistill.protocols import Pool, Selector
from icdistill.types import ANSWER, IMAGE, IMAGE_TEXT, TEXT, Demo, Embeddings, ICDError, Query


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _similarities(
    query_vec: np.ndarray | None, pool: Pool, key: str, candidates: list[int] | None
) -> dict[int, float] | None:
    """Cosine similarity of the query to pool demos under ``key``; None when either side lacks it."""
    if query_vec is None:
        return None
    ids, mat = pool.vectors(key)
    if not ids:
        return None
    # rounded so that ties between identical vectors are real ties (BLAS sums differ by ~1e-7) and
    # the documented tie-break, older demo first, decides them
    sims = np.round(mat @ _unit(query_vec), 5)
    scored = dict(zip(ids, sims.tolist(), strict=True))
    if candidates is not None:
        scored = {i: scored[i] for i in candidates if i in scored}
        if not scored:
            return None
    return scored


def same_kind(demo: Demo, query: Query) -> bool:
    """Whether ``demo`` answers the same kind of question as ``query``: the same option set, or both
    open. A demo of another kind teaches the wrong answer format (a free caption for a multiple
    choice question, or the options of another question)."""
    opts = demo.provenance.get("options")
    return (tuple(opts) if opts else None) == (tuple(query.options) if query.options else None)


def _eligible(query: Query, pool: Pool, mix: bool) -> list[int]:
    """Candidate demo ids for ``query``, oldest first."""
    return [d.id for d in pool.demos() if mix or same_kind(d, query)]


def _backfill(ranked: list[int], previous: list[int] | None, size: int) -> list[int]:
    """``ranked`` topped up to ``size`` from ``previous`` (in its order): demos a stage could not score
    (missing the stage's key) are not lost."""
    if previous is None or len(ranked) >= size:
        return ranked
    have = set(ranked)
    return ranked + [i for i in previous if i not in have][: size - len(ranked)]


def _top(scored: dict[int, float], k: int, keep_ties: bool = False) -> list[int]:
    # stable tie-break on demo id (older first) keeps selection deterministic
    ranked = sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))
    if keep_ties and len(ranked) > k > 0:
        # a filtering stage must not cut between equal scores (e.g. every prompt of a
        # classification stream is the same text): keep everything tied with the k-th
        cut = ranked[k - 1][1] - 1e-6
        return [i for i, s in ranked if s >= cut]
    return [i for i, _ in ranked[:k]]


class RandomSelector:
    """k demos drawn uniformly from the pool (the weak baseline of the paper)."""

    def __init__(self, seed: int = 0, mix_questions: bool = False) -> None:
        self.seed = seed
        self.mix_questions = mix_questions

    def select(self, query: Query, embeddings: Embeddings, pool: Pool, k: int) -> list[Demo]:
        demos = pool.demos()
        if not self.mix_questions:
            demos = [d for d in demos if same_kind(d, query)]
        if k <= 0 or not demos:
            return []
        # seeded per query so a resumed run picks the same demos
        rng = np.random.default_rng([self.seed, query.position])
        idx = rng.choice(len(demos), size=min(k, len(demos)), replace=False)
        return [demos[i] for i in idx]


class SimilaritySelector:
    """Top-k by cosine similarity in one space: query ``query_key`` against demo ``demo_key``."""

    def __init__(
        self, query_key: str, demo_key: str, fallback: Selector | None = None, mix_questions: bool = False
    ) -> None:
        self.query_key = query_key
        self.demo_key = demo_key
        self.mix_questions = mix_questions
        self.fallback = fallback or RandomSelector(mix_questions=mix_questions)

    def select(self, query: Query, embeddings: Embeddings, pool: Pool, k: int) -> list[Demo]:
        if k <= 0 or len(pool) == 0:
            return []
        candidates = _eligible(query, pool, self.mix_questions)
        if not candidates:
            return []
        scored = _similarities(embeddings.get(self.query_key), pool, self.demo_key, candidates)
        if scored is None:
            return self.fallback.select(query, embeddings, pool, k)
        ids = _top(scored, k)
        if len(ids) < k:  # demos without this space's vector come after the scored ones
            ids = _backfill(ids, [d.id for d in self.fallback.select(query, embeddings, pool, k)], k)
        return [pool.get(i) for i in ids]


class CrossModalSelector:
    """The paper's staged retrieval: text-text (K_tt) -> image-to-answer text (K_it) -> image-image (k).

    Each stage narrows the candidates of the previous one; a stage is skipped when its modality is
    missing on the query or in the pool, and when it would not narrow (K >= candidates).
    """

    def __init__(self, k_tt: int = 64, k_it: int = 16, seed: int = 0, mix_questions: bool = False) -> None:
        if k_tt < 1 or k_it < 1:
            raise ICDError(f"--k-tt and --k-it must be >= 1, got --k-tt {k_tt} --k-it {k_it}")
        self.k_tt = k_tt
        self.k_it = k_it
        self.seed = seed
        self.mix_questions = mix_questions

    def select(self, query: Query, embeddings: Embeddings, pool: Pool, k: int) -> list[Demo]:
        if k <= 0 or len(pool) == 0:
            return []
        candidates = _eligible(query, pool, self.mix_questions)
        if not candidates:
            return []
        stages = ((TEXT, TEXT, self.k_tt), (IMAGE_TEXT, ANSWER, self.k_it), (IMAGE, IMAGE, k))
        last: dict[int, float] | None = None
        candidates = sorted(candidates)
        for n_stage, (q_key, d_key, size) in enumerate(stages):
            scored = _similarities(embeddings.get(q_key), pool, d_key, candidates)
            if scored is None:
                continue
            last = scored
            final = n_stage == len(stages) - 1
            ranked = _top(scored, max(size, k), keep_ties=not final)
            # demos the stage could not score (no vector under its key) stay behind the scored ones
            candidates = _backfill(ranked, candidates, max(size, k))
        if last is None:
            return RandomSelector(self.seed, self.mix_questions).select(query, embeddings, pool, k)
        # candidates are ordered by the last stage that ran
        return [pool.get(i) for i in candidates[:k]] if candidates else []


SELECTORS = ("random", "image", "text", "image-text", "cross-modal")


def make_selector(
    name: str, *, seed: int = 0, k_tt: int = 64, k_it: int = 16, mix_questions: bool = False
) -> Selector:
    """A selector by name. Demos answer the same kind of question as the query (same option set, or
    both open) unless ``mix_questions``."""
    mix = mix_questions
    if name == "random":
        return RandomSelector(seed, mix)
    if name == "image":
        return SimilaritySelector(IMAGE, IMAGE, RandomSelector(seed, mix), mix)
    if name == "text":
        return SimilaritySelector(TEXT, TEXT, RandomSelector(seed, mix), mix)
    if name == "image-text":
        return SimilaritySelector(IMAGE_TEXT, ANSWER, RandomSelector(seed, mix), mix)
    if name == "cross-modal":
        return CrossModalSelector(k_tt=k_tt, k_it=k_it, seed=seed, mix_questions=mix)
    raise ICDError(f"unknown selector {name!r}; choose one of {', '.join(SELECTORS)}")
