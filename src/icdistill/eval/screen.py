"""What ``icd eval`` prints when it ends: a table that fits a terminal (the full one is in report.md),
the classes that fell below the student alone with its lift per class, and a warning about a teacher
whose answers did not match the labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icdistill.eval.per_class import KNOWS_LIFT, MIN_QUERIES, WORSE_BY, ZERO_SHOT, class_flags, class_results
from icdistill.eval.rows import _groups, series_label, spread


def _median(values: Sequence[Any], fmt: str) -> str:
    s = spread(values)
    return "-" if s is None else format(s["median"], fmt)


def _range(values: Sequence[Any]) -> str:
    s = spread(values)
    if s is None:
        return "-"
    if s["min"] == s["max"]:
        return f"{s['median']:.3f}"
    return f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"


def screen_table(rows: Sequence[dict[str, Any]]) -> Any:
    """A rich table, one line per method x budget: accuracy median [min, max] over seeds, first
    pass, teacher-call rate and the first seed's s/query (narrow enough for 80 columns)."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    table.add_column("method", overflow="fold", ratio=1)
    table.add_column("accuracy", no_wrap=True)
    table.add_column("first pass", justify="right", no_wrap=True)
    table.add_column("calls", justify="right", no_wrap=True)
    table.add_column("s/query", justify="right", no_wrap=True)
    for (method, budget), rs in _groups(rows).items():
        table.add_row(
            series_label(method, budget),
            _range([r.get("accuracy") for r in rs]),
            _median([r.get("first_pass_accuracy") for r in rs], ".3f"),
            _median([r.get("teacher_call_rate") for r in rs], ".1%"),
            _median([rs[0].get("seconds_per_query")], ".2f"),
        )
    return table


def teacher_note(rows: Sequence[dict[str, Any]]) -> str | None:
    """The run's teacher warning (``icdistill.report.teacher_warning``) over every cell's teacher
    answers pooled, against the student alone's accuracy (or the cells' first pass)."""
    from icdistill.report import teacher_warning

    checked = [
        (r["teacher_label_accuracy"], r.get("teacher_label_checked") or 0)
        for r in rows
        if r.get("teacher_label_accuracy") is not None
    ]
    n = sum(c for _, c in checked)
    if not n:
        return None
    alone = [r.get("accuracy") for r in rows if r["method"] == ZERO_SHOT]
    student = spread(alone) or spread([r.get("first_pass_accuracy") for r in rows])
    if student is None:
        return None
    summary = {
        "teacher_label_accuracy": sum(a * c for a, c in checked) / n,
        "teacher_label_checked": n,
        "first_pass_accuracy": student["median"],
    }
    return teacher_warning(summary)


def class_lines(rows: Sequence[dict[str, Any]], out: Path) -> list[str]:
    """The per-class drops below the student alone (violations first) and its lift per class."""
    res = class_results(rows, out, "label")
    if ZERO_SHOT not in res["columns"]:
        return []
    lines = []
    lifts = [(g, st["lift"]) for g, st in res["groups"].items() if st.get("lift") is not None]
    if lifts:
        lines.append(
            f"{ZERO_SHOT}'s lift per class (>= {KNOWS_LIFT}: it knows the class; near 1: it guesses): "
            + ", ".join(f"{g} {lift:.1f}" for g, lift in lifts)
        )
    flags = sorted(class_flags(res), key=lambda f: (not f["violation"], f["value"] - f["alone"]))
    if not flags:
        lines.append(
            f"no class with >= {MIN_QUERIES} queries is more than {WORSE_BY} below {ZERO_SHOT} on any order"
        )
    for f in flags:
        lift = "" if f["lift"] is None else f", lift {f['lift']:.1f}"
        what = "VIOLATION (it knows the class)" if f["violation"] else "below the student alone"
        lines.append(
            f"{what}: {f['column']} on {f['group']}: {f['value']:.3f} vs {f['alone']:.3f} on seed "
            f"{f['seed']} ({f['n']:g} queries{lift})"
        )
    return lines


def ungated_cells(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[int]]]:
    """Per gated method and budget, the seeds whose teacher calls were all forced (warm-up, pacing):
    those cells compare no gates."""
    out = []
    for (m, b), rs in _groups(rows).items():
        seeds = [r["seed"] for r in rs if r.get("gate_chosen_calls") == 0]
        if seeds and any(r.get("gate_chosen_calls") is not None for r in rs):
            out.append((series_label(m, b), seeds))
    return out


def print_screen(rows: Sequence[dict[str, Any]], out: Path, console: Any) -> None:
    """The end of ``icd eval`` on ``console``."""
    console.print(screen_table(rows))
    for line in class_lines(rows, out):
        style = "bold red" if line.startswith("VIOLATION") else "yellow" if line.startswith("below") else None
        console.print(line, style=style, markup=False, highlight=False, soft_wrap=True)
    for label, seeds in ungated_cells(rows):
        console.print(
            f"warning: no gate-chosen teacher call in {label} (seeds {', '.join(map(str, seeds))}): every "
            "call was forced by the warm-up or pacing; lengthen the stream or raise the budget (report.md)",
            style="yellow",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    note = teacher_note(rows)
    if note:
        # whole lines (a file or a pipe is not cut at 80 columns; a terminal wraps them itself)
        console.print(f"warning: {note}", style="yellow", markup=False, highlight=False, soft_wrap=True)
