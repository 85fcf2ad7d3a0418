"""The eval report's per-class results: accuracy per label (or question kind) for each method beside the
student alone, drops below it on any stream order, and how much the student alone knows each class
(the lift of its answers), which says whether a drop breaks the goal of never doing worse than it."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icdistill.eval.plots import plot_per_class
from icdistill.eval.rows import _cell_log, _groups, series_label
from icdistill.runlog import read_records

WORSE_BY = 0.05  # a class this much below student-zero-shot on some stream order is flagged
MIN_QUERIES = 10  # ... when it has at least this many queries
KNOWS_LIFT = 1.5  # the student alone knows a class when its answers of it are this much likelier right
ZERO_SHOT = "student-zero-shot"


def answer_lift(logs: Sequence[Sequence[dict[str, Any]]]) -> dict[str, float | None]:
    """Per label, over the given logs pooled: precision of the answers naming it (how often an answer
    "c" is right) divided by its share of the stream. Near 1, answering "c" says nothing (a guess);
    >= ``KNOWS_LIFT``, the model knows the class. None for a label it never answered."""
    said: dict[str, int] = defaultdict(int)
    right: dict[str, int] = defaultdict(int)
    seen: dict[str, int] = defaultdict(int)
    total = 0
    for records in logs:
        for r in records:
            if r.get("event") != "query" or r.get("label") is None or r.get("correct") is None:
                continue
            label, answer = str(r["label"]), str(r.get("answer"))
            total += 1
            seen[label] += 1
            said[answer] += 1
            right[answer] += int(answer == label)
    return {
        label: (right[label] / said[label]) / (n / total) if said[label] else None
        for label, n in seen.items()
    }


def class_results(rows: Sequence[dict[str, Any]], out: Path, key: str = "label") -> dict[str, Any]:
    """Per label (or per question kind, ``key="kind"``), from the cells' logs: for each column (a
    method x budget, and the first pass of ``icd``) the accuracy on each seed and its median, and the
    median number of queries of the label per stream; per label, the student alone's ``answer_lift``.

    Returns ``{"columns": [...], "groups": {g: {"n": median count, "lift": lift or None, column:
    median accuracy}}, "seeds": {g: {column: {seed: accuracy}}}}``; a method scored on its first pass
    (``oracle-icl``) is so here too."""
    from icdistill.eval.methods import METHODS, parse_method
    from icdistill.eval.scores import per_group

    columns: list[str] = []
    values: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    counts: dict[str, dict[int, int]] = defaultdict(dict)
    zero_shot_logs = []
    for (method, budget), rs in _groups(rows).items():
        spec = parse_method(method)
        first_only = METHODS[spec.name].accuracy_key == "first_pass_accuracy"
        label = series_label(method, budget)
        cols = [(label, "first_correct" if first_only else "correct")]
        if spec.name == "icd":
            cols.insert(0, (f"{label} first pass", "first_correct"))
        stats_by_seed = []
        for r in rs:
            log = _cell_log(out, method, budget, r["seed"])
            if log.exists():
                records = read_records(log)
                stats_by_seed.append((r["seed"], per_group(records, key)))
                if method == ZERO_SHOT:
                    zero_shot_logs.append(records)
        if not stats_by_seed:
            continue
        columns += [c for c, _ in cols]
        for seed, stats in stats_by_seed:
            for g, st in stats.items():
                counts[g].setdefault(seed, st["n"])
                for col, field in cols:
                    values[g][col][seed] = st[field] / st["n"]
    lift = answer_lift(zero_shot_logs) if key == "label" and zero_shot_logs else {}
    groups: dict[str, dict[str, Any]] = {}
    for g in sorted(values):
        groups[g] = {"n": statistics.median(counts[g].values()), "lift": lift.get(g)}
        for col in columns:
            xs = values[g].get(col)
            groups[g][col] = statistics.median(xs.values()) if xs else None
    seeds = {g: {col: dict(by_seed) for col, by_seed in values[g].items()} for g in sorted(values)}
    return {"columns": columns, "groups": groups, "seeds": seeds}


def worst_order(res: dict[str, Any], g: str, col: str) -> tuple[int, float, float] | None:
    """The stream order (seed) on which ``col`` is furthest below ``student-zero-shot`` on ``g``:
    ``(seed, accuracy, student alone's)``; None without a shared seed."""
    by_seed = res.get("seeds", {}).get(g, {})
    mine, alone = by_seed.get(col, {}), by_seed.get(ZERO_SHOT, {})
    shared = sorted(set(mine) & set(alone))
    if not shared:
        return None
    seed = min(shared, key=lambda s: (mine[s] - alone[s], s))
    return seed, mine[seed], alone[seed]


def class_flags(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each (class, column) with ``MIN_QUERIES`` queries or more that is more than ``WORSE_BY`` below
    ``student-zero-shot`` on some stream order; ``violation``: the student alone knows that class
    (lift >= ``KNOWS_LIFT``), so the drop breaks 'never worse than the student alone'."""
    if ZERO_SHOT not in res["columns"]:
        return []
    out = []
    for g, st in res["groups"].items():
        if st["n"] < MIN_QUERIES:
            continue
        for col in res["columns"]:
            worst = worst_order(res, g, col) if col != ZERO_SHOT else None
            if worst is None or worst[1] >= worst[2] - WORSE_BY:
                continue
            lift = st.get("lift")
            out.append(
                {
                    "group": g,
                    "column": col,
                    "n": st["n"],
                    "seed": worst[0],
                    "value": worst[1],
                    "alone": worst[2],
                    "median": st.get(col),
                    "median_alone": st.get(ZERO_SHOT),
                    "lift": lift,
                    "violation": lift is not None and lift >= KNOWS_LIFT,
                }
            )
    return out


def flag_text(f: dict[str, Any]) -> str:
    lift = "" if f["lift"] is None else f", lift {f['lift']:.1f}"
    return (
        f"`{f['column']}` on `{f['group']}`: {f['value']:.3f} vs {f['alone']:.3f} on seed {f['seed']} "
        f"(median {f['median']:.3f} vs {f['median_alone']:.3f}; {f['n']:g} queries{lift})"
    )


def class_table(res: dict[str, Any], what: str = "label") -> tuple[str, list[str]]:
    """Markdown: rows = labels with their query count (and the student alone's lift), columns =
    methods, median accuracy over seeds; a cell whose class (``MIN_QUERIES`` queries or more) is more
    than ``WORSE_BY`` below ``student-zero-shot`` on some seed is marked ▼ (▼! where the student alone
    knows the class), and listed in the returned flags."""
    columns, groups = res["columns"], res["groups"]
    if not groups:
        return "", []
    ref = ZERO_SHOT if ZERO_SHOT in columns else None
    order = ([ref] if ref else []) + [c for c in columns if c != ref]
    with_lift = any(st.get("lift") is not None for st in groups.values())
    lift_head = " lift |" if with_lift else ""
    lines = [
        f"| {what} | queries |{lift_head} " + " | ".join(order) + " |",
        "|---|---|" + ("---|" if with_lift else "") + "---|" * len(order),
    ]
    flags = {(f["group"], f["column"]): f for f in class_flags(res)}
    for g, st in groups.items():
        cells = []
        for col in order:
            v = st.get(col)
            text = "-" if v is None else f"{v:.3f}"
            f = flags.get((g, col))
            if f is not None:
                text = f"**{text} {'▼!' if f['violation'] else '▼'}**"
            cells.append(text)
        lift = st.get("lift")
        lift_cell = (" -" if lift is None else f" {lift:.1f}") + " |" if with_lift else ""
        lines.append(f"| {g} | {st['n']:g} |{lift_cell} " + " | ".join(cells) + " |")
    ordered = sorted(flags.values(), key=lambda f: (not f["violation"], f["value"] - f["alone"]))
    return "\n".join(lines), [("**violation** " if f["violation"] else "") + flag_text(f) for f in ordered]


def class_section(rows: Sequence[dict[str, Any]], out: Path) -> list[str]:
    """The report's per-class part: the table per label, per question kind when both kinds are
    asked, and the flags against the student alone."""
    res = class_results(rows, out, "label")
    table, flags = class_table(res, "label")
    if not table:
        return []
    parts = [
        "## Per class",
        "",
        f"Median accuracy over seeds per label (queries: per stream, median over seeds), final answers "
        f"unless marked first pass. An average can hide a class that got worse: **▼** marks a class with "
        f">= {MIN_QUERIES} queries where a method is more than {WORSE_BY} below `{ZERO_SHOT}` on some "
        f"stream order (seed), not only by the median. **lift**: how much likelier `{ZERO_SHOT}`'s "
        f"answer of a class is right than the class's share of the stream (precision / share; near 1 it "
        f"merely guesses, >= {KNOWS_LIFT} it knows the class). **▼!** marks a drop on a class the student "
        f"alone knows: a violation of 'never worse than the student alone'.",
        "",
        table,
        "",
    ]
    kinds = class_results(rows, out, "kind")
    if len(kinds["groups"]) > 1:
        k_table, k_flags = class_table(kinds, "question kind")
        flags += k_flags
        parts += ["Per question kind (options vs open answers):", "", k_table, ""]
    if ZERO_SHOT not in res["columns"]:
        parts += [f"No `{ZERO_SHOT}` in this grid: nothing to flag a class against.", ""]
    elif flags:
        parts += [f"Classes worse than `{ZERO_SHOT}` by more than {WORSE_BY} on some stream order:", ""]
        parts += [f"- {f}" for f in flags] + [""]
    else:
        parts += [
            f"No class with >= {MIN_QUERIES} queries is more than {WORSE_BY} below `{ZERO_SHOT}` on any "
            "stream order.",
            "",
        ]
    plot_per_class(res, out / "per_class.png")
    parts += ["![per-class accuracy](per_class.png)", ""]
    return parts
