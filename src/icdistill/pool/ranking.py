"""Ranking the vector index's candidates: merge groups' members into one ranking, cut scores to the top k
(ties by id, older first), as an exact scan would order them."""

from __future__ import annotations

import numpy as np


def _merge(
    parts: list[np.ndarray], part_scores: list[float], k: int, keep_ties: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Groups' member ids (each ascending) with their group's score, in descending score order, to
    one ranking. Only groups with equal scores need a sort; the common case is a concatenation."""
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    counts = [len(p) for p in parts]
    if not keep_ties:
        # the first groups that hold k ids, plus any tied with the last of them
        total, last = 0, 0
        for last, c in enumerate(counts):  # noqa: B007
            total += c
            if total >= k:
                break
        kth = part_scores[last]
        n_parts = last + 1
        while n_parts < len(parts) and part_scores[n_parts] >= kth - 1e-6:
            n_parts += 1
        parts, part_scores, counts = parts[:n_parts], part_scores[:n_parts], counts[:n_parts]
    ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
    scores = np.repeat(np.asarray(part_scores, dtype=np.float32), counts)
    if len(set(part_scores)) < len(part_scores):
        order = np.lexsort((ids, -scores))
        ids, scores = ids[order], scores[order]
    if not keep_ties:
        ids, scores = ids[:k], scores[:k]
    return ids, scores


def _top(ids: np.ndarray, scores: np.ndarray, k: int, keep_ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` by score, ties by id ascending; with ``keep_ties`` everything within 1e-6 of the k-th.

    Scores are rounded to 1e-5 first, as the selectors do: BLAS sums of identical vectors differ by
    ~1e-7, and those must be ties decided by age, not by summation order."""
    n = len(ids)
    if n == 0:
        return ids[:0], scores[:0].astype(np.float32)
    if n > 4 * k + 64:
        # rounding and sorting only what can reach the top k (with slack for the rounding)
        rough = np.partition(scores, n - k)[n - k] - 2e-5
        sel = scores >= rough
        ids, scores = ids[sel], scores[sel]
        n = len(ids)
    scores = np.round(scores, 5)
    if n > k:
        kth = np.partition(scores, n - k)[n - k]
        cut = kth - 1e-6 if keep_ties else kth
        sel = scores >= cut
        ids, scores = ids[sel], scores[sel]
    order = np.lexsort((ids, -scores))
    ids, scores = ids[order], scores[order].astype(np.float32)
    if not keep_ties:
        ids, scores = ids[:k], scores[:k]
    return ids, scores
