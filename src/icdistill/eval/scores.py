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
    if len({u for u, _ in firsts}) > 1:
        out["auroc"] = auroc([u for u, _ in firsts], [not c for _, c in firsts])
        out["reliability"] = reliability([u for u, _ in firsts], [c for _, c in firsts])
    else:
        # a constant uncertainty (e.g. a student that always abstains for the teacher) ranks nothing:
        # no AUROC of 0.5 and no reliability curve for it
        out["auroc"], out["reliability"] = None, []
    # the budget gate's own score (coverage, uncertainty or both) as a detector of first-pass errors
    scored = [(r["gate_score"], bool(r["first_correct"])) for r in qs if _finite(r.get("gate_score"))]
    distinct = len({g for g, _ in scored}) > 1 and len({c for _, c in scored}) > 1
    out["gate_auroc"] = auroc([g for g, _ in scored], [not c for _, c in scored]) if distinct else None
    if open_answers and qs:
        answers = [str(r["answer"] or "") for r in qs]
        refs = [str(r["label"]) for r in qs]
        out["exact_match"] = sum(map(exact_match, answers, refs)) / len(qs)
        out["token_f1"] = sum(map(token_f1, answers, refs)) / len(qs)
        out["bleu"], out["chrf"] = corpus_bleu_chrf(answers, refs)
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


# gate reasons of decisions forced by pacing, not chosen from the uncertainty (logs written before
# ``gate_forced`` was recorded)
FORCED_REASONS = ("warm-up", "behind budget", "calibrating", "over budget", "cap reached", "cost cap")


def gate_forced(rec: dict[str, Any]) -> bool:
    """Whether a query's call or skip was forced by pacing (warm-up, behind or over budget, calibrating,
    caps): the record's ``gate_forced`` when it has one, else read from its ``gate_reason``."""
    forced = rec.get("gate_forced")
    if forced is not None:
        return bool(forced)
    return str(rec.get("gate_reason") or "").startswith(FORCED_REASONS)


def _acc(xs: Sequence[Any]) -> float | None:
    return sum(bool(x) for x in xs) / len(xs) if xs else None


def query_breakdown(records: Sequence[dict[str, Any]], demo_order: str = "best-last") -> dict[str, Any]:
    """What a summary's averages hide, from a cell's query records.

    ``first_pass_accuracy``: the student's answers before any teacher call (no query's own demo in its
    prompt). ``unasked_accuracy``: final answers of the queries the teacher was not asked (a query sent
    to the teacher is re-answered with its own new demo, a copy at cosine 1, or forwarded).
    ``gate_chosen_calls`` / ``forced_calls``: teacher calls the gate chose on its own vs. those forced
    by pacing (warm-up, behind budget, calibrating). ``demo_accuracy_at``: demonstration accuracy of
    the k nearest demos, k = 1.. (methods with different shot counts compared at the same k). Demos are
    logged in prompt order: nearest last with ``demo_order`` "best-last" (the default), else first.
    """
    qs = [r for r in records if r.get("event") == "query"]
    labelled = [r for r in qs if r.get("label") is not None and r.get("correct") is not None]
    asked = [r for r in qs if r.get("teacher_asked")]
    forced = sum(gate_forced(r) for r in asked)
    at: dict[int, list[float]] = {}
    for r in labelled:
        answers = list(r.get("demo_answers") or [])
        if demo_order == "best-last":
            answers.reverse()  # nearest first: the k nearest are answers[:k]
        for k in range(1, len(answers) + 1):
            at.setdefault(k, []).append(sum(a == r["label"] for a in answers[:k]) / k)
    return {
        "first_pass_accuracy": _acc([r["first_correct"] for r in labelled]),
        "unasked_accuracy": _acc([r["correct"] for r in labelled if not r.get("teacher_asked")]),
        "unasked_n": sum(not r.get("teacher_asked") for r in labelled),
        "gate_chosen_calls": len(asked) - forced,
        "forced_calls": forced,
        "demo_accuracy_at": {str(k): sum(v) / len(v) for k, v in sorted(at.items())},
    }


def per_group(records: Sequence[dict[str, Any]], key: str = "label") -> dict[str, dict[str, int]]:
    """Per label (``key="label"``) or per question kind (``key="kind"``: options / open): queries, right
    final answers, right first passes, teacher calls."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        if r.get("event") != "query" or r.get("label") is None or r.get("correct") is None:
            continue
        if key == "kind":
            g = r.get("ctx_kind") or ("options" if r.get("option_probs") is not None else "open")
        else:
            g = str(r[key])
        s = out.setdefault(g, {"n": 0, "correct": 0, "first_correct": 0, "asked": 0})
        s["n"] += 1
        s["correct"] += int(bool(r["correct"]))
        s["first_correct"] += int(bool(r.get("first_correct")))
        s["asked"] += int(bool(r.get("teacher_asked")))
    return out
