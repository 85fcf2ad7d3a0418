"""Summary metrics of a run, computed from its per-query log records."""

from __future__ import annotations

import statistics
from typing import Any


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


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
    return {
        "n_queries": n,
        "skipped_inputs": sum(r.get("event") == "bad_input" for r in records),
        "accuracy": _mean([float(r["correct"]) for r in labelled]),
        "first_pass_accuracy": _mean([float(r["first_correct"]) for r in labelled]),
        "student_only_accuracy": _mean([float(r["correct"]) for r in not_asked]),
        "teacher_calls": len(asked),
        "teacher_call_rate": len(asked) / n if n else 0.0,
        "teacher_failures": sum(r.get("teacher_error") is not None for r in asked),
        "accepted_annotations": sum(bool(a["accepted"]) for a in anns),
        "rejected_annotations": sum(not a["accepted"] for a in anns),
        "teacher_label_accuracy": _mean(
            [
                float(a["answer"] == r["label"])
                for r, a in ((r, r["annotation"]) for r in asked if r.get("annotation"))
                if r["label"] is not None
            ]
        ),
        "pool_size": qs[-1]["pool_size"] if qs else 0,
        "demonstration_accuracy": _mean(demo_acc),
        "mean_uncertainty": _mean([r["uncertainty"] for r in qs]),
        "answered_by": {
            k: sum(r["answered_by"] == k for r in qs) for k in sorted({r["answered_by"] for r in qs})
        },
        "teacher_usage": usage,
        "student_seconds": sum(r["seconds"]["student"] for r in qs),
        "teacher_seconds": sum(r["seconds"]["teacher"] for r in qs),
        "embed_seconds": sum(r["seconds"]["embed"] for r in qs),
        "seconds_per_query": _mean([r["seconds"]["total"] for r in qs]),
    }
