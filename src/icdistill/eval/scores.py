"""Scores of an evaluation cell from its per-query log: open-answer metrics (VQA exact match, token F1,
BLEU, chrF) and how well the student's uncertainty predicts its errors (AUROC, reliability bins)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from icdistill.teacher import normalise_answer, token_f1


def exact_match(answer: str, reference: str) -> float:
    """VQA-style: 1.0 when the normalised forms are equal."""
    return float(normalise_answer(answer) == normalise_answer(reference))


__all__ = ["auroc", "cell_scores", "corpus_bleu_chrf", "exact_match", "reliability", "token_f1"]


def corpus_bleu_chrf(answers: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """Corpus BLEU and chrF (sacrebleu, 0-100) of answers against one reference each."""
    import sacrebleu

    refs = [list(references)]
    return (
        float(sacrebleu.corpus_bleu(list(answers), refs).score),
        float(sacrebleu.corpus_chrf(list(answers), refs).score),
    )


def auroc(uncertainty: Sequence[float], wrong: Sequence[bool]) -> float | None:
    """Probability that a wrong answer is more uncertain than a right one (ties count half);
    None when all answers are right or all wrong."""
    pos = [u for u, w in zip(uncertainty, wrong, strict=True) if w]
    neg = [u for u, w in zip(uncertainty, wrong, strict=True) if not w]
    if not pos or not neg:
        return None
    # rank-sum form: O(n log n)
    allv = sorted([(u, 1) for u in pos] + [(u, 0) for u in neg])
    rank_sum, i = 0.0, 0
    while i < len(allv):
        j = i
        while j < len(allv) and allv[j][0] == allv[i][0]:
            j += 1
        avg_rank = (i + 1 + j) / 2  # 1-based ranks i+1..j share their mean
        rank_sum += avg_rank * sum(lbl for _, lbl in allv[i:j])
        i = j
    n_pos, n_neg = len(pos), len(neg)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def reliability(
    uncertainty: Sequence[float], correct: Sequence[bool], bins: int = 5
) -> list[dict[str, float]]:
    """Accuracy per uncertainty quantile bin (equal counts), least uncertain first."""
    pairs = sorted(zip(uncertainty, correct, strict=True), key=lambda p: p[0])
    if not pairs:
        return []
    bins = max(1, min(bins, len(pairs)))
    out = []
    for b in range(bins):
        chunk = pairs[b * len(pairs) // bins : (b + 1) * len(pairs) // bins]
        if chunk:
            out.append(
                {
                    "uncertainty_mean": sum(u for u, _ in chunk) / len(chunk),
                    "accuracy": sum(c for _, c in chunk) / len(chunk),
                    "n": float(len(chunk)),
                }
            )
    return out


def cell_scores(records: Sequence[dict[str, Any]], open_answers: bool) -> dict[str, Any]:
    """Scores a summary does not have: uncertainty quality of the first pass, and for open answers
    normalised exact match, token F1, BLEU and chrF of the final answers."""
    qs = [r for r in records if r.get("event") == "query" and r.get("label") is not None]
    out: dict[str, Any] = {}
    firsts = [(r["uncertainty"], bool(r["first_correct"])) for r in qs if _finite(r["uncertainty"])]
    out["auroc"] = auroc([u for u, _ in firsts], [not c for _, c in firsts])
    out["reliability"] = reliability([u for u, _ in firsts], [c for _, c in firsts])
    if open_answers and qs:
        answers = [str(r["answer"] or "") for r in qs]
        refs = [str(r["label"]) for r in qs]
        out["exact_match"] = sum(map(exact_match, answers, refs)) / len(qs)
        out["token_f1"] = sum(map(token_f1, answers, refs)) / len(qs)
        out["bleu"], out["chrf"] = corpus_bleu_chrf(answers, refs)
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
