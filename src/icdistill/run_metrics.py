"""Summary metrics of a run, computed from its per-query log records (``icd run``'s summary, and each
eval cell's)."""

from __future__ import annotations

import statistics
from collections.abc import Collection
from typing import Any

from icdistill.teacher import normalise_answer


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _group_accuracy(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Per value of ``key``: queries, final and first-pass accuracy, and accuracy on the queries the
    teacher was not asked (what the student did alone with the pool)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get(key)), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(groups):
        g = groups[name]
        alone = [r for r in g if not r["teacher_asked"]]
        out[name] = {
            "n": len(g),
            "accuracy": _mean([float(r["correct"]) for r in g]),
            "first_pass_accuracy": _mean([float(r["first_correct"]) for r in g]),
            "student_only_accuracy": _mean([float(r["correct"]) for r in alone]),
            "teacher_calls": sum(bool(r["teacher_asked"]) for r in g),
        }
    return out


# a label met this often with no demo of it pooled is named in the run's warnings
NEVER_POOLED_MIN = 10


def never_pooled(
    records: list[dict[str, Any]], pooled: Collection[str] | None = None, min_queries: int = NEVER_POOLED_MIN
) -> dict[str, int]:
    """Labels the stream met at least ``min_queries`` times that are no pooled demo's answer: label ->
    queries. ``pooled``: the pool's answers (default: the accepted teacher answers of ``records``).
    Where the pool is blind to a class, the demos can only pull its queries toward other classes."""
    qs = [r for r in records if r.get("event") == "query" and r.get("label") is not None]
    if pooled is None:
        pooled = {
            r["annotation"]["answer"] for r in qs if r.get("annotation") and r["annotation"].get("accepted")
        }
    counts: dict[str, int] = {}
    for r in qs:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    return {k: n for k, n in sorted(counts.items()) if n >= min_queries and k not in pooled}


def copy_rate(records: list[dict[str, Any]]) -> float | None:
    """Share of first passes with demos whose answer is the nearest demo's answer: near 1, the student
    copies its nearest demo whatever it reads itself."""
    rows = [r for r in records if r.get("event") == "query" and r.get("nearest_demo_answer") is not None]
    return _mean([float(r["first_answer"] == r["nearest_demo_answer"]) for r in rows])


_EXPERT_ANSWERS = (("icl", "icl_answer"), ("zero-shot", "zero_shot_answer"), ("vote", "vote_answer"))


def _judged(records: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if r.get("event") == "query" and ((r.get("student_details") or {}).get("judge") or {}).get("by") == by
    ]


def _experts(rows: list[dict[str, Any]], experts: tuple[tuple[str, str], ...], same: Any) -> dict[str, Any]:
    """Per expert: how often it was read, its first-pass accuracy where read, the student's seconds per
    judged query on it; the envelope over the queries where all were read."""
    details = [r["student_details"]["judge"] for r in rows]
    labelled = [(r, j) for r, j in zip(rows, details, strict=True) if r.get("label") is not None]
    out: dict[str, Any] = {}
    for name, key in experts:
        read = [(r, j) for r, j in labelled if key in j]
        out[name] = {
            "read": sum(key in j for j in details),
            "first_pass_accuracy": _mean([float(same(j[key], r["label"])) for r, j in read]),
            "seconds_per_judged_query": _mean(
                [float((j.get("seconds") or {}).get(name, 0.0)) for j in details]
            ),
        }
    every = [(r, j) for r, j in labelled if all(key in j for _, key in experts)]
    return {
        "judged_queries": len(rows),
        "first_pass_accuracy": _mean([float(r["first_correct"]) for r, _ in labelled]),
        "experts": out,
        "all_read": len(every),
        "envelope": _mean([float(any(same(j[key], r["label"]) for _, key in experts)) for r, j in every]),
        "first_pass_accuracy_all_read": _mean([float(r["first_correct"]) for r, _ in every]),
    }


def _same_open(a: str, b: str) -> bool:
    return normalise_answer(a) == normalise_answer(b)


def judge_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What each of the judge's experts said on the first passes it judged (``icdistill.judge``): how
    often it was read, its accuracy there, the student's seconds per judged query on it; and, over the
    queries where all three were read (every query with ``--judge full``), the share where any of them
    was right (the envelope) beside the judged first pass. Open questions (``icdistill.judge_open``)
    under ``open``, with how often each expert was chosen. None when no query was judged."""
    rows, open_rows = _judged(records, "judge"), _judged(records, "judge-open")
    if not rows and not open_rows:
        return None
    out: dict[str, Any] = {"judged_queries": 0}
    if rows:
        details = [r["student_details"]["judge"] for r in rows]
        out = _experts(rows, _EXPERT_ANSWERS, lambda a, b: a == b)
        out["icl_copies_nearest_demo"] = _mean(
            [float(j["icl_copies_nearest_demo"]) for j in details if "icl_copies_nearest_demo" in j]
        )
    if open_rows:
        out["open"] = _experts(open_rows, _EXPERT_ANSWERS, _same_open)
        chosen = [r["student_details"]["judge"]["chosen"] for r in open_rows]
        out["open"]["chosen"] = {name: chosen.count(name) for name, _ in _EXPERT_ANSWERS}
    return out


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, teacher spend, pool and timing figures of a run (labels needed for accuracy)."""
    qs = [r for r in records if r.get("event") == "query"]
    labelled = [r for r in qs if r.get("correct") is not None]
    asked = [r for r in qs if r["teacher_asked"]]
    anns = [r["annotation"] for r in asked if r.get("annotation")]
    not_asked = [r for r in labelled if not r["teacher_asked"]]
    usage = {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": 0.0,
        "faults": 0,
        "requests": 0,
        "cached": 0,
    }
    for a in anns:
        u = a.get("usage") or {}
        usage["prompt_tokens"] += u.get("prompt_tokens", 0)
        usage["completion_tokens"] += u.get("completion_tokens", 0)
        usage["cost_usd"] += u.get("cost_usd", 0.0)
        usage["faults"] += u.get("faults", 0)
        usage["requests"] += u.get("calls", 0)
        usage["cached"] += u.get("cached", 0)
    # failed calls (no annotation) were requests too: their retries count as faults
    usage["faults"] += sum(r.get("teacher_error_faults") or 0 for r in asked)
    demo_acc = [r["demo_accuracy"] for r in qs if r.get("demo_accuracy") is not None]
    n = len(qs)
    chosen = [r for r in asked if not r.get("gate_forced", False)]
    checked = [
        float(r["annotation"]["answer"] == r["label"])
        for r in asked
        if r.get("annotation") and r["label"] is not None
    ]
    return {
        "n_queries": n,
        "skipped_inputs": sum(r.get("event") == "bad_input" for r in records),
        "accuracy": _mean([float(r["correct"]) for r in labelled]),
        "first_pass_accuracy": _mean([float(r["first_correct"]) for r in labelled]),
        "student_only_accuracy": _mean([float(r["correct"]) for r in not_asked]),
        "teacher_calls": len(asked),
        "teacher_call_rate": len(asked) / n if n else 0.0,
        # calls the gate chose by its score (not forced by the warm-up, pacing or a cap)
        "gate_chosen_calls": len(chosen),
        "teacher_failures": sum(r.get("teacher_error") is not None for r in asked),
        "accepted_annotations": sum(bool(a["accepted"]) for a in anns),
        "rejected_annotations": sum(not a["accepted"] for a in anns),
        "teacher_label_accuracy": _mean(checked),
        # how many teacher answers had a label to compare with (what the accuracy above rests on)
        "teacher_label_checked": len(checked),
        "pool_size": qs[-1]["pool_size"] if qs else 0,
        "demonstration_accuracy": _mean(demo_acc),
        "first_answer_is_nearest_demo": copy_rate(records),
        "per_label": _group_accuracy(labelled, "label"),
        "per_kind": _group_accuracy(labelled, "ctx_kind"),
        "never_pooled_labels": never_pooled(records),
        "mean_uncertainty": _mean([r["uncertainty"] for r in qs]),
        "answered_by": {
            k: sum(r["answered_by"] == k for r in qs) for k in sorted({r["answered_by"] for r in qs})
        },
        "teacher_usage": usage,
        "student_seconds": sum(r["seconds"]["student"] for r in qs),
        "teacher_seconds": sum(r["seconds"]["teacher"] for r in qs),
        "embed_seconds": sum(r["seconds"]["embed"] for r in qs),
        "seconds_per_query": _mean([r["seconds"]["total"] for r in qs]),
        "judge": judge_summary(records),
    }
