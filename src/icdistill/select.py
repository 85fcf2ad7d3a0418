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
    sims = mat @ _unit(query_vec)
    scored = dict(zip(ids, sims.tolist(), strict=True))
    if candidates is not None:
        scored = {i: scored[i] for i in candidates if i in scored}
        if not scored:
            return None
    return scored


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

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def select(self, query: Query, embeddings: Embeddings, pool: Pool, k: int) -> list[Demo]:
        demos = pool.demos()
        if k <= 0 or not demos:
            return []
        # seeded per query so a resumed run picks the same demos
        rng = np.random.default_rng([self.seed, query.position])
        idx = rng.choice(len(demos), size=min(k, len(demos)), replace=False)
        return [demos[i] for i in idx]


class SimilaritySelector:
    """Top-k by cosine similarity in one space: query ``query_key`` against demo ``demo_key``."""

    def __init__(self, query_key: str, demo_key: str, fallback: Selector | None = None) -> None:
        self.query_key = query_key
        self.demo_key = demo_key
        self.fallback = fallback or RandomSelector()

    def select(self, query: Query, embeddings: Embeddings, pool: Pool, k: int) -> list[Demo]:
        if k <= 0 or len(pool) == 0:
            return []
        scored = _similarities(embeddings.get(self.query_key), pool, self.demo_key, None)
        if scored is None:
            return self.fallback.select(query, embeddings, pool, k)
        return [pool.get(i) for i in _top(scored, k)]


class CrossModalSelector:
    """The paper's staged retrieval: text-text (K_tt) -> image-to-answer text (K_it) -> image-image (k).

    Each stage narrows the candidates of the previous one; a stage is skipped when its modality is
    missing on the query or in the pool, and when it would not narrow (K >= candidates).
    """

    def __init__(self, k_tt: int = 64, k_it: int = 16) -> None:
        if k_tt < 1 or k_it < 1:
            raise ICDError("K_tt and K_it must be >= 1")
        self.k_tt = k_tt
        self.k_it = k_it

    def select(self, query: Query, embeddings: Embeddings, pool: Pool, k: int) -> list[Demo]:
        if k <= 0 or len(pool) == 0:
            return []
        candidates: list[int] | None = None
        stages = ((TEXT, TEXT, self.k_tt), (IMAGE_TEXT, ANSWER, self.k_it), (IMAGE, IMAGE, k))
        last: dict[int, float] | None = None
        for n_stage, (q_key, d_key, size) in enumerate(stages):
            scored = _similarities(embeddings.get(q_key), pool, d_key, candidates)
            if scored is None:
                continue
            last = scored
            final = n_stage == len(stages) - 1
            candidates = _top(scored, max(size, k), keep_ties=not final)
        if last is None:
            return RandomSelector().select(query, embeddings, pool, k)
        # candidates are ordered by the last stage that ran
        return [pool.get(i) for i in candidates[:k]] if candidates else []


SELECTORS = ("random", "image", "text", "image-text", "cross-modal")


def make_selector(name: str, *, seed: int = 0, k_tt: int = 64, k_it: int = 16) -> Selector:
    if name == "random":
        return RandomSelector(seed)
    if name == "image":
        return SimilaritySelector(IMAGE, IMAGE, RandomSelector(seed))
    if name == "text":
        return SimilaritySelector(TEXT, TEXT, RandomSelector(seed))
    if name == "image-text":
        return SimilaritySelector(IMAGE_TEXT, ANSWER, RandomSelector(seed))
    if name == "cross-modal":
        return CrossModalSelector(k_tt=k_tt, k_it=k_it)
    raise ICDError(f"unknown selector {name!r}; choose one of {', '.join(SELECTORS)}")
