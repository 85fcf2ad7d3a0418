"""Demonstration selectors: random, image-image, text-text, and the staged cross-modal retrieval.

Selectors ask the pool for ranked candidate lists (``pool.search``: its vector index, exact while
the pool is small and HNSW beyond) instead of scoring every demo; a pool without ``search`` is
scanned exactly with the same ranking. Ranking: cosine rounded to 1e-5, ties older demo first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from icdistill.errors import ICDError
from icdistill.protocols import Pool, Selector
from icdistill.types import ANSWER, IMAGE, IMAGE_TEXT, TEXT, Demo, Embeddings, Query


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _rank(
    query_vec: np.ndarray | None,
    pool: Pool,
    key: str,
    n: int,
    candidates: np.ndarray | None,
    keep_ties: bool = False,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Ids and scores of the ``n`` demos (within ``candidates``; None: all) most similar to the query
    under ``key``, best first, ties older first (``keep_ties``: all tied with the n-th too). None when
    the query lacks the key or no candidate has a vector under it."""
    if query_vec is None:
        return None
    search = getattr(pool, "search", None)
    if search is not None:
        ids, scores = search(key, query_vec, n, candidates=candidates, keep_ties=keep_ties)
    else:
        ids, scores = _scan(query_vec, pool, key, n, candidates, keep_ties)
    return (ids, scores) if len(ids) else None


def _scan(
    query_vec: np.ndarray, pool: Pool, key: str, n: int, candidates: np.ndarray | None, keep_ties: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ranking over ``pool.vectors`` (for pools without an index)."""
    ids_l, mat = pool.vectors(key)
    if not ids_l:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    ids = np.asarray(ids_l, dtype=np.int64)
    # rounded so that ties between identical vectors are real ties (BLAS sums differ by ~1e-7) and
    # the documented tie-break, older demo first, decides them
    sims = np.round(mat @ _unit(query_vec), 5)
    if candidates is not None:
        keep = np.isin(ids, candidates)
        ids, sims = ids[keep], sims[keep]
    order = np.lexsort((ids, -sims))
    ids, sims = ids[order], sims[order]
    if keep_ties and len(ids) > n > 0:
        return ids[sims >= sims[n - 1] - 1e-6], sims[sims >= sims[n - 1] - 1e-6]
    return ids[:n], sims[:n]


def same_kind(demo: Demo, query: Query) -> bool:
    """Whether ``demo`` answers the same kind of question as ``query``: the same option set, or both
    open. A demo of another kind teaches the wrong answer format (a free caption for a multiple
    choice question, or the options of another question)."""
    opts = demo.provenance.get("options")
    return (tuple(opts) if opts else None) == (tuple(query.options) if query.options else None)


def _eligible(query: Query, pool: Pool, mix: bool) -> np.ndarray | None:
    """Candidate demo ids for ``query``, oldest first; None when every pooled demo is one."""
    if mix:
        return None
    kind_ids = getattr(pool, "kind_ids", None)
    if kind_ids is not None:
        return kind_ids(query.options)
    demos = pool.demos()
    ids = [d.id for d in demos if same_kind(d, query)]
    return None if len(ids) == len(demos) else np.asarray(sorted(ids), dtype=np.int64)


def _in_order(pool: Pool, candidates: np.ndarray | list[int] | None) -> list[int]:
    """The candidates as a list in their order; None stands for every pooled demo, oldest first."""
    if candidates is None:
        return sorted(d.id for d in pool.demos())
    return [int(i) for i in candidates]


def _backfill(ranked: list[int], previous: list[int] | None, size: int) -> list[int]:
    """``ranked`` topped up to ``size`` from ``previous`` (in its order): demos a stage could not score
    (missing the stage's key) are not lost."""
    if previous is None or len(ranked) >= size:
        return ranked
    have = set(ranked)
    return ranked + [i for i in previous if i not in have][: size - len(ranked)]


class RandomSelector:
    """k demos drawn uniformly from the pool (the weak baseline of the paper)."""

    def __init__(self, seed: int = 0, mix_questions: bool = False) -> None:
        self.seed = seed
        self.mix_questions = mix_questions

    def select(self, query: Query, embeddings: Embeddings, pool: Pool, k: int) -> list[Demo]:
        eligible = _eligible(query, pool, self.mix_questions)
        demos = pool.demos() if eligible is None else [pool.get(int(i)) for i in eligible]
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
        if candidates is not None and not len(candidates):
            return []
        ranked = _rank(embeddings.get(self.query_key), pool, self.demo_key, k, candidates)
        if ranked is None:
            return self.fallback.select(query, embeddings, pool, k)
        ids = ranked[0].tolist()
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
        if candidates is not None and not len(candidates):
            return []
        stages = ((TEXT, TEXT, self.k_tt), (IMAGE_TEXT, ANSWER, self.k_it), (IMAGE, IMAGE, k))
        ran = False
        # the candidates in the order of the last stage that ran; None: every pooled demo, oldest
        # first (never materialised for a stage that does not narrow, e.g. one prompt for all)
        order: np.ndarray | list[int] | None = candidates
        for n_stage, (q_key, d_key, size) in enumerate(stages):
            final = n_stage == len(stages) - 1
            want = max(size, k)
            cand = None if order is None else np.asarray(order, dtype=np.int64)
            got = _rank(embeddings.get(q_key), pool, d_key, want, cand, keep_ties=not final)
            if got is None:
                continue
            ran = True
            ids, scores = got
            n_before = len(pool) if order is None else len(order)
            if not final and len(ids) >= n_before and scores[0] == scores[-1]:
                # every candidate tied: the stage keeps them all, oldest first
                order = None if order is None else np.sort(cand)
                continue
            # demos the stage could not score (no vector under its key) stay behind the scored ones
            order = _backfill(ids.tolist(), _in_order(pool, order), want) if len(ids) < want else ids
        if not ran:
            return RandomSelector(self.seed, self.mix_questions).select(query, embeddings, pool, k)
        head = _in_order(pool, order)[:k] if order is None else [int(i) for i in order[:k]]
        return [pool.get(i) for i in head]


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


def _nearest_ids(
    query: Query, embeddings: Embeddings, pool: Pool, k: int, key: str, exclude: Sequence[int]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Ids and cosines of the ``k`` pooled demos of the query's kind nearest under ``key``, best first;
    None when there is none (or the query has no ``key``). ``exclude``: demo ids left out."""
    if len(pool) == 0 or k < 1:
        return None
    candidates = _eligible(query, pool, mix=False)
    if exclude:
        left_out = {int(i) for i in exclude}
        candidates = np.asarray(
            [i for i in _in_order(pool, candidates) if i not in left_out], dtype=np.int64
        )
    if candidates is not None and not len(candidates):
        return None
    return _rank(embeddings.get(key), pool, key, k, candidates)


def nearest_demo_similarity(
    query: Query, embeddings: Embeddings, pool: Pool, key: str = IMAGE, exclude: Sequence[int] = ()
) -> float | None:
    """Cosine similarity of the query to its nearest pooled demo of the same kind under ``key``: how
    well the pool covers it. None when the pool holds no such demo (or the query has no ``key``).
    ``exclude``: demo ids left out (a resumed query's own demo, pooled before its log line)."""
    got = _nearest_ids(query, embeddings, pool, 1, key, exclude)
    return None if got is None else float(got[1][0])


def nearest_demos(
    query: Query, embeddings: Embeddings, pool: Pool, k: int, key: str = IMAGE, exclude: Sequence[int] = ()
) -> tuple[list[Demo], np.ndarray] | None:
    """The ``k`` pooled demos of the query's kind nearest under ``key`` and their cosines, best first
    (the judge's vote); None when there is none."""
    got = _nearest_ids(query, embeddings, pool, k, key, exclude)
    if got is None:
        return None
    ids, sims = got
    return [pool.get(int(i)) for i in ids], np.asarray(sims, dtype=np.float64)


def question_kind_count(query: Query, pool: Pool) -> int:
    """How many pooled demos answer a question of the query's kind as a gate keeps it
    (``GateContext.kind``): with options (any option set) or open. Per option set it would stay 0
    on a stream whose questions each have their own options."""
    kind_ids = getattr(pool, "kind_ids", None)
    if kind_ids is not None:
        open_ids = kind_ids(None)
        n_open = len(pool) if open_ids is None else len(open_ids)
    else:
        n_open = sum(not d.provenance.get("options") for d in pool.demos())
    return len(pool) - n_open if query.options else n_open
