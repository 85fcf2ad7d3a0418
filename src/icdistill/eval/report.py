"""The eval report: medians [min, max] over seeds per method x budget, paired differences, per-class
results beside the student alone, and plots (accuracy vs achieved teacher-call rate, running first-pass
accuracy along the stream, uncertainty reliability, per-class accuracy)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icdistill.eval.per_class import class_results, class_section, class_table
from icdistill.eval.plots import plot_reliability, plot_running, plot_tradeoff
from icdistill.eval.rows import _budget, _groups, series_label, spread
from icdistill.eval.screen import teacher_note, ungated_cells

__all__ = ["class_results", "class_section", "class_table", "paired_table", "summary_table", "write_report"]


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
        "s/query (first seed)",
        "s/query (other seeds)",
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
            _cell([rs[0]["seconds_per_query"]], digits=2),
            _cell([r["seconds_per_query"] for r in rs[1:]], digits=2),
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
        "- **s/query (first seed)**: seconds per query of the method's first stream order, the one "
        "whose student readings were not cached before it; **(other seeds)** may read the readings "
        "the first one cached (the student alone's prompts are the same on every order: near 0 s), so "
        "they time a warm student, not the method. Both with every stream image already through the "
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
    empty = [f"`{label}` (seeds {', '.join(map(str, seeds))})" for label, seeds in ungated_cells(rows)]
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


def write_report(rows: Sequence[dict[str, Any]], cfg: Any, out: Path, split: str | None = "") -> None:
    """report.md and the plots in ``out``; ``split``: the split the dataset was read from (None: it has
    none, e.g. a folder; "": not known here, the ``--split`` flag is shown)."""
    from icdistill.eval.cells import reference_method
    from icdistill.eval.judge_report import judge_section

    base = cfg.base
    parts = [
        "# icd eval report",
        "",
        f"Dataset `{base.dataset}`{_split_note(base.split if split == '' else split)}, {base.n} queries "
        "per stream, seeds "
        f"{', '.join(map(str, cfg.seeds))} (a seed is a stream order), student `{base.student}`, "
        f"teacher `{base.teacher}`, embedder `{base.embedder}`. Medians over seeds with [min, max].",
        "",
        summary_table(rows),
        "",
        *summary_notes(rows),
        "",
    ]
    note = teacher_note(rows)
    if note:
        parts += [f"**Warning**: {note}.", ""]
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
    parts += judge_section(rows)
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


def _split_note(split: str | None) -> str:
    return "" if split is None else f" (split {split})"
