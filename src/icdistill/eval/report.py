"""The eval report: medians [min, max] over seeds per method x budget, paired differences, per-class
results beside the student alone, and plots (accuracy vs achieved teacher-call rate, running first-pass
accuracy along the stream, uncertainty reliability, per-class accuracy)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icdistill.eval.plots import (
    plot_per_class,
    plot_reliability,
    plot_running,
    plot_tradeoff,
)
from icdistill.eval.rows import _budget, _cell_log, _groups, series_label, spread
from icdistill.runlog import read_records


def _fmt(v: float, pct: bool = False, digits: int = 3) -> str:
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def _cell(values: Sequence[float | None], pct: bool = False, digits: int = 3) -> str:
    """``median [min, max]`` over seeds (a comma, not a dash: ``[-0.425, -0.300]``)."""
    s = spread(values)
    if s is None:
        return "-"
    if s["min"] == s["max"]:
        return _fmt(s["median"], pct, digits)
    return f"{_fmt(s['median'], pct, digits)} [{_fmt(s['min'], pct, digits)}, {_fmt(s['max'], pct, digits)}]"


def common_k(rows: Sequence[dict[str, Any]]) -> int | None:
    """The largest k every method that selects demos reached: demo accuracy is compared there."""
    ks = [max(int(k) for k in r["demo_accuracy_at"]) for r in rows if r.get("demo_accuracy_at")]
    return min(ks) if ks else None


def _demo_at(r: dict[str, Any], k: int | None) -> float | None:
    at = r.get("demo_accuracy_at") or {}
    return None if k is None else at.get(str(k))


def _gated(rs: Sequence[dict[str, Any]]) -> bool:
    return any(r.get("gate_chosen_calls") is not None for r in rs)


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per method x budget, medians [min, max] over seeds."""
    open_answers = any(r.get("exact_match") is not None for r in rows)
    k = common_k(rows)
    head = [
        "method",
        "budget",
        "seeds",
        "accuracy",
        "first pass",
        "not asked",
        "teacher-call rate",
        "teacher calls",
        "gate-chosen calls",
        f"demo accuracy @{k}" if k else "demo accuracy",
        "demo accuracy (own k)",
        "AUROC (uncertainty vs error)",
        "s/query (warm cache)",
        "cost USD",
    ]
    if open_answers:
        head += ["exact match", "token F1", "BLEU", "chrF"]
    if any(r.get("train_seconds") is not None for r in rows):
        head += ["train s", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, budget), rs in _groups(rows).items():
        chosen = _cell([r.get("gate_chosen_calls") for r in rs], digits=0)
        if _gated(rs) and all(r.get("gate_chosen_calls") == 0 for r in rs):
            chosen += " (none!)"
        cells = [
            method,
            _budget(budget),
            str(len(rs)),
            _cell([r["accuracy"] for r in rs]),
            _cell([r.get("first_pass_accuracy") for r in rs]),
            _cell([r.get("unasked_accuracy") for r in rs]),
            _cell([r["teacher_call_rate"] for r in rs], pct=True),
            _cell([r["teacher_calls"] for r in rs], digits=0),
            chosen,
            _cell([_demo_at(r, k) for r in rs]),
            _cell([r["demonstration_accuracy"] for r in rs]),
            _cell([r["auroc"] for r in rs], digits=2),
            _cell([r["seconds_per_query"] for r in rs], digits=2),
            _cell([r["cost_usd"] for r in rs], digits=4),
        ]
        if open_answers:
            cells += [
                _cell([r.get("exact_match") for r in rs]),
                _cell([r.get("token_f1") for r in rs]),
                _cell([r.get("bleu") for r in rs], digits=1),
                _cell([r.get("chrf") for r in rs], digits=1),
            ]
        if "train s" in head:
            cells += [
                _cell([r.get("train_seconds") for r in rs], digits=1),
                _cell([r.get("peak_rss_mb") for r in rs], digits=0),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What each column of the summary measures, and the cells that measured nothing."""
    k = common_k(rows)
    embed = spread([r.get("image_embed_seconds") for r in rows])
    notes = [
        "- **accuracy** (the headline of this table, of the paired table and of `tradeoff.png`): the "
        "final answers of all queries. A query sent to the teacher is re-answered with its own new demo "
        "in the prompt (`icd`, `knn-pool`: a copy of itself) or with the teacher's answer (`*-forward`, "
        "`teacher-zero-shot`), so it counts the teacher's labels; `oracle-icl` is scored on its first pass.",
        "- **first pass**: the student's answers before any teacher call, on every query (no query sees "
        "its own label): the same scoring for every method; `running.png` plots it.",
        "- **not asked**: final answers of the queries the teacher was *not* asked.",
        "- **gate-chosen calls**: teacher calls the gate chose on its own (from the uncertainty, or the "
        "random gate's draw); the other calls were forced by pacing (warm-up, behind budget, "
        "calibrating)."
        + (
            " `icd-random-gate` makes as many calls as `icd` on the same seed and budget, at random "
            "queries after the same warm-up (`icd-random-gate:calls=rate` holds the target rate instead)."
            if any(r["method"].split(":")[0] == "icd-random-gate" for r in rows)
            else ""
        ),
        f"- **demo accuracy @{k}**: share of the {k} nearest selected demos (by the method's own "
        "ranking) with the query's label, the same k for every method; **(own k)** uses each method's "
        "own shots (not comparable across k)."
        if k
        else "- **demo accuracy**: share of selected demos with the query's label.",
        "- **s/query (warm cache)**: seconds per query with every stream image already through the "
        "embedder's CNN once before the cells (whatever cell ran first)"
        + (
            f"; that one-time image embedding, not included, took {embed['median']:.3f} s per query"
            if embed
            else ""
        )
        + ".",
    ]
    unmatched = [
        f"`{series_label(r['method'], r['budget'])}` seed {r['seed']}"
        for r in rows
        if r["method"].split(":")[0] == "icd-random-gate"
        and "calls=rate" not in r["method"]
        and r.get("matched_calls") is None
    ]
    if unmatched:
        notes.append(
            "- **Not matched to `icd`'s call count** (held the target rate instead: `icd` was not in the "
            "grid, or had not finished when the cell started, e.g. on Ray): " + ", ".join(unmatched) + "."
        )
    empty = [
        f"`{series_label(m, b)}` (seeds {', '.join(str(r['seed']) for r in rs if r.get('gate_chosen_calls') == 0)})"
        for (m, b), rs in _groups(rows).items()
        if _gated(rs) and any(r.get("gate_chosen_calls") == 0 for r in rs)
    ]
    if empty:
        notes.append(
            "- **No gate-chosen call** in "
            + ", ".join(empty)
            + ": every teacher call of these cells was forced by warm-up or pacing, so they compare no "
            "gates (the stream is too short for the budget: lengthen it or raise the budget)."
        )
    return notes


def paired_table(rows: Sequence[dict[str, Any]], reference: str) -> str:
    """Markdown: accuracy (and first-pass accuracy) of each method minus ``reference`` on the same seed
    (and budget, where both have one), median [min, max] over seeds, with wins / ties / losses."""
    by_key = {(r["method"], r["budget"], r["seed"]): r for r in rows}
    ref_rows = [r for r in rows if r["method"] == reference]
    if not ref_rows:
        return ""
    lines = [
        f"| method | budget | accuracy - {reference} (same seed) | wins / ties / losses | "
        f"first pass - {reference} | gate-chosen calls (method; {reference}) |",
        "|---|---|---|---|---|---|",
    ]
    for (method, budget), rs in _groups(rows).items():
        if method == reference:
            continue
        diffs, firsts, chosen, ref_chosen = [], [], [], []
        for r in rs:
            ref = by_key.get((reference, budget, r["seed"]))
            if ref is None:
                ref = by_key.get((reference, None, r["seed"]))
            if ref is None:
                # a budget-free method against each budget of the reference: compare with the first
                ref = next((x for x in ref_rows if x["seed"] == r["seed"]), None)
            if ref is None:
                continue
            if r["accuracy"] is not None and ref["accuracy"] is not None:
                diffs.append(r["accuracy"] - ref["accuracy"])
            if r.get("first_pass_accuracy") is not None and ref.get("first_pass_accuracy") is not None:
                firsts.append(r["first_pass_accuracy"] - ref["first_pass_accuracy"])
            chosen.append(r.get("gate_chosen_calls"))
            ref_chosen.append(ref.get("gate_chosen_calls"))
        if not diffs:
            continue
        eps = 1e-12
        wins = sum(d > eps for d in diffs)
        ties = sum(abs(d) <= eps for d in diffs)
        losses = len(diffs) - wins - ties
        calls = "-"
        if any(c is not None for c in chosen):
            calls = f"{_cell(chosen, digits=0)}; {_cell(ref_chosen, digits=0)}"
            if all(c == 0 for c in chosen) and all(c == 0 for c in ref_chosen):
                calls += " (no gate compared)"
        lines.append(
            f"| {method} | {_budget(budget)} | {_cell(diffs)} | {wins} / {ties} / {losses} | "
            f"{_cell(firsts)} | {calls} |"
        )
    return "\n".join(lines)


# per-class results -------------------------------------------------------------------------------

WORSE_BY = 0.05  # a class this much below student-zero-shot is flagged
MIN_QUERIES = 10  # ... when it has at least this many queries
ZERO_SHOT = "student-zero-shot"


def class_results(rows: Sequence[dict[str, Any]], out: Path, key: str = "label") -> dict[str, Any]:
    """Per label (or per question kind, ``key="kind"``), from the cells' logs: for each column (a
    method x budget, and the first pass of ``icd``) the median accuracy over seeds, and the median
    number of queries of the label per stream.

    Returns ``{"columns": [...], "groups": {g: {"n": median count, column: median accuracy}}}``; a
    method scored on its first pass (``oracle-icl``) is so here too."""
    from icdistill.eval.methods import METHODS, parse_method
    from icdistill.eval.scores import per_group

    columns: list[str] = []
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    counts: dict[str, dict[int, int]] = defaultdict(dict)
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
                stats_by_seed.append((r["seed"], per_group(read_records(log), key)))
        if not stats_by_seed:
            continue
        columns += [c for c, _ in cols]
        for seed, stats in stats_by_seed:
            for g, st in stats.items():
                counts[g].setdefault(seed, st["n"])
                for col, field in cols:
                    values[g][col].append(st[field] / st["n"])
    groups: dict[str, dict[str, Any]] = {}
    for g in sorted(values):
        groups[g] = {"n": statistics.median(counts[g].values())}
        for col in columns:
            xs = values[g].get(col)
            groups[g][col] = statistics.median(xs) if xs else None
    return {"columns": columns, "groups": groups}


def class_table(res: dict[str, Any], what: str = "label") -> tuple[str, list[str]]:
    """Markdown: rows = labels with their query count, columns = methods, median accuracy over seeds;
    a cell more than ``WORSE_BY`` below ``student-zero-shot`` on a label with ``MIN_QUERIES`` queries
    or more is marked, and listed in the returned flags."""
    columns, groups = res["columns"], res["groups"]
    if not groups:
        return "", []
    ref = ZERO_SHOT if ZERO_SHOT in columns else None
    order = ([ref] if ref else []) + [c for c in columns if c != ref]
    lines = [
        f"| {what} | queries | " + " | ".join(order) + " |",
        "|---|---|" + "---|" * len(order),
    ]
    flags = []
    for g, st in groups.items():
        cells = []
        for col in order:
            v = st.get(col)
            text = "-" if v is None else f"{v:.3f}"
            base = st.get(ref) if ref else None
            if (
                ref
                and col != ref
                and v is not None
                and base is not None
                and st["n"] >= MIN_QUERIES
                and v < base - WORSE_BY
            ):
                text = f"**{text} ▼**"
                flags.append(f"`{col}` on `{g}`: {v:.3f} vs {base:.3f} ({st['n']:g} queries)")
            cells.append(text)
        lines.append(f"| {g} | {st['n']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines), flags


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
        f">= {MIN_QUERIES} queries where a method is more than {WORSE_BY} below `{ZERO_SHOT}`.",
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
        parts += [f"Classes worse than `{ZERO_SHOT}` by more than {WORSE_BY}:", ""]
        parts += [f"- {f}" for f in flags] + [""]
    else:
        parts += [f"No class with >= {MIN_QUERIES} queries is more than {WORSE_BY} below `{ZERO_SHOT}`.", ""]
    plot_per_class(res, out / "per_class.png")
    parts += ["![per-class accuracy](per_class.png)", ""]
    return parts


def write_report(rows: Sequence[dict[str, Any]], cfg: Any, out: Path) -> None:
    """report.md and the plots in ``out``."""
    from icdistill.eval.cells import reference_method

    base = cfg.base
    parts = [
        "# icd eval report",
        "",
        f"Dataset `{base.dataset}` ({base.split}), {base.n} queries per stream, seeds "
        f"{', '.join(map(str, cfg.seeds))} (a seed is a stream order), student `{base.student}`, "
        f"teacher `{base.teacher}`, embedder `{base.embedder}`. Medians over seeds with [min, max].",
        "",
        summary_table(rows),
        "",
        *summary_notes(rows),
        "",
    ]
    reference = reference_method(cfg.methods)
    if reference:
        parts += [
            f"Paired against `{reference}` on the same stream order (a budget-free method against "
            f"`{reference}` at its first budget); a difference within 1e-12 is a tie:",
            "",
            paired_table(rows, reference),
            "",
        ]
    parts += class_section(rows, out)
    plots = [
        ("tradeoff.png", "accuracy vs achieved teacher-call rate", plot_tradeoff),
        ("running.png", "running first-pass accuracy along the stream", plot_running),
        ("reliability.png", "first-pass accuracy by uncertainty quintile", plot_reliability),
    ]
    for name, title, fn in plots:
        notes = fn(rows, out, out / name)
        parts += [f"![{title}]({name})", ""]
        if notes:
            parts += [*(f"- {n}" for n in notes), ""]
    (out / "report.md").write_text("\n".join(parts) + "\n", encoding="utf-8")
