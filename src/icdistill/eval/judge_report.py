"""The eval report's judge section: for each judged method (``icd`` and its variants), what each of
the judge's experts got right on the first passes it judged, what each cost, and, where every expert
was read (``icd:judge=full``), the envelope (the share of queries any of them gets right) and whether
the judged first pass reaches the midpoint between the best single expert and the envelope."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from icdistill.eval.rows import _groups, series_label

EXPERTS = ("icl", "zero-shot", "vote")


def _median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def judge_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method x budget with judged queries: medians over seeds of each expert's first-pass
    accuracy, share read and student seconds per judged query, the judged first pass, and (all read)
    the envelope, the best expert and the midpoint test on each seed."""
    out = []
    for (method, budget), rs in _groups(rows).items():
        judged = [r["judge"] for r in rs if (r.get("judge") or {}).get("experts")]
        if not judged:
            continue
        entry: dict[str, Any] = {"series": series_label(method, budget), "seeds": len(judged)}
        for name in EXPERTS:
            ex = [j["experts"][name] for j in judged]
            entry[name] = _median([e["first_pass_accuracy"] for e in ex])
            entry[f"{name}_read"] = _median(
                [e["read"] / j["judged_queries"] for e, j in zip(ex, judged, strict=True)]
            )
            entry[f"{name}_seconds"] = _median([e["seconds_per_judged_query"] for e in ex])
        entry["judged"] = _median([j["first_pass_accuracy"] for j in judged])
        full = [j for j in judged if j["all_read"] == j["judged_queries"] and j["envelope"] is not None]
        if full:
            gaps = []
            for j in full:
                best = max(j["experts"][n]["first_pass_accuracy"] or 0.0 for n in EXPERTS)
                mid = (best + j["envelope"]) / 2
                gaps.append((j["first_pass_accuracy_all_read"] or 0.0) - mid)
            entry["envelope"] = _median([j["envelope"] for j in full])
            entry["over_midpoint"] = _median(gaps)
            entry["reached"] = sum(g >= 0 for g in gaps)
        out.append(entry)
    return out


def _open_summary(j: dict[str, Any]) -> dict[str, Any]:
    """An open-question summary, its ``nearest`` expert (as summaries before the open vote named it)
    renamed ``vote``."""
    rename = {"nearest": "vote"}
    return {
        **j,
        "experts": {rename.get(k, k): v for k, v in j["experts"].items()},
        "chosen": {rename.get(k, k): v for k, v in j["chosen"].items()},
    }


def open_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The judge's open questions (``icdistill.judge_open``): per method, medians over seeds of each
    expert's first-pass accuracy where read, how often each was chosen, and the judged first pass."""
    lines = []
    for (method, budget), rs in _groups(rows).items():
        judged = [_open_summary(r["judge"]["open"]) for r in rs if (r.get("judge") or {}).get("open")]
        if not judged:
            continue
        acc = [_fmt(_median([j["experts"][n]["first_pass_accuracy"] for j in judged])) for n in EXPERTS]
        chosen = [_fmt(_median([j["chosen"][n] / j["judged_queries"] for j in judged]), 2) for n in EXPERTS]
        env = _median([j["envelope"] for j in judged if j["all_read"] == j["judged_queries"]])
        lines.append(
            f"| {series_label(method, budget)} | {' | '.join(acc)} | {' / '.join(chosen)} | "
            f"{_fmt(_median([j['first_pass_accuracy'] for j in judged]))} | {_fmt(env)} |"
        )
    if not lines:
        return []
    return [
        "### The judge on open questions (first passes it judged; medians over seeds)",
        "",
        "| method | ICL | zero-shot | vote of the nearest demos | chosen ICL / zero-shot / vote | judged | envelope |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
    ]


def judge_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The report.md lines of the judge section (none when no method was judged)."""
    entries = judge_rows(rows)
    if not entries:
        return open_lines(rows)
    lines = [
        "### The judge's experts (first passes it judged; medians over seeds)",
        "",
        "| method | ICL | zero-shot | vote | judged | zero-shot read | s/query ICL | s/query zero-shot | "
        "envelope | judged - midpoint (seeds >= 0) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        mid = (
            f"{e['over_midpoint']:+.3f} ({e['reached']} of {e['seeds']})"
            if e.get("envelope") is not None
            else "-"
        )
        lines.append(
            f"| {e['series']} | {_fmt(e['icl'])} | {_fmt(e['zero-shot'])} | {_fmt(e['vote'])} | "
            f"{_fmt(e['judged'])} | {_fmt(e['zero-shot_read'], 2)} | {_fmt(e['icl_seconds'])} | "
            f"{_fmt(e['zero-shot_seconds'])} | {_fmt(e.get('envelope'))} | {mid} |"
        )
    lines += [
        "",
        "An expert's accuracy counts the judged first passes where it was read (with `--judge on` the "
        "zero-shot reading is read only where it could change the answer). The envelope is the share of "
        "queries any expert gets right, known where every expert was read (`icd:judge=full`); the midpoint "
        "lies between the best single expert and the envelope.",
        "",
    ]
    return lines + open_lines(rows)
