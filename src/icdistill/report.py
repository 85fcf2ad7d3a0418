"""What a user sees of a run: a live progress bar and a summary table."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


@contextmanager
def progress_callbacks(
    console: Console, disabled: bool = False
) -> Iterator[tuple[Callable[[int, int], None], Callable[[dict[str, Any]], None]]]:
    """(on_start, on_record) callbacks that drive a rich progress bar with running accuracy and spend."""
    progress = Progress(
        TextColumn("[bold]ICD"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disabled,
    )
    state = {"task": None, "n": 0, "correct": 0, "labelled": 0, "calls": 0, "pool": 0, "in_flight": 0}
    resumed = [False]

    def on_start(start: int, total: int) -> None:
        # models load lazily: the first query can take tens of seconds, say so instead of a still bar
        state["task"] = progress.add_task("icd", total=total, completed=start, stats=STARTING)
        resumed[0] = start > 0  # the bar counts the whole run; its accuracy and calls, this session's

    def on_record(rec: dict[str, Any]) -> None:
        if rec.get("event") == "query":
            state["n"] += 1
            if rec.get("correct") is not None:
                state["labelled"] += 1
                state["correct"] += int(rec["correct"])
            state["calls"] += int(rec["teacher_asked"])
            state["pool"] = rec["pool_size"]
            # teacher calls still running when the record was written (--teacher-concurrency)
            state["in_flight"] = rec.get("in_flight", 0)
        acc = state["correct"] / state["labelled"] if state["labelled"] else 0.0
        rate = state["calls"] / state["n"] if state["n"] else 0.0
        stats = f"acc {acc:.3f}  teacher {state['calls']} ({rate:.1%})"
        stats += f" this session  pool {state['pool']}" if resumed[0] else f"  pool {state['pool']}"
        if state["in_flight"]:
            stats += f"  in flight {state['in_flight']}"
        if state["task"] is not None:
            progress.update(state["task"], advance=1, stats=stats)  # type: ignore[arg-type]

    with progress:
        yield on_start, on_record


STARTING = "loading models (the first query waits for them)..."
# warned about: a teacher's label accuracy this far below the student's own (first pass), or below
# TEACHER_FLOOR (a teacher wrong more often than right fills the pool with wrong demos)
TEACHER_GAP = 0.1
TEACHER_FLOOR = 0.5
MIN_ANNOTATIONS = 5  # fewer teacher annotations say too little to compare rates: their counts are said


def teacher_warning(summary: dict[str, Any]) -> str | None:
    """A warning when the teacher disagrees with the labels far more than the student alone does, or
    more often than not: its demos then teach wrong answers (e.g. a small served LM pooling "13.5"
    at agreement 1.0)."""
    teacher, student = summary.get("teacher_label_accuracy"), summary.get("first_pass_accuracy")
    annotations = summary.get("accepted_annotations", 0) + summary.get("rejected_annotations", 0)
    checked = int(summary.get("teacher_label_checked", annotations))  # teacher answers with a label
    if teacher is None or student is None or not checked:
        return None
    if checked < MIN_ANNOTATIONS:
        # too few to compare rates: say what the counts show when most of them missed
        matched = round(teacher * checked)
        if 2 * matched >= checked:
            return None
        return (
            f"only {matched} of {checked} teacher answers matched the labels (too few to say more; the "
            f"student's own, before the teacher: {student:.0%}): its demos may teach wrong answers. Check "
            "the teacher (a stronger model, --samples 5 --agreement 0.6) or the labels"
        )
    if teacher > student - TEACHER_GAP and teacher >= TEACHER_FLOOR:
        return None
    return (
        f"the teacher's answers matched the labels only {teacher:.0%} of the time (the student's own, "
        f"before the teacher: {student:.0%}): its demos teach wrong answers. Check the teacher (a "
        "stronger model, --samples 5 --agreement 0.6) or the labels"
    )


def eval_hint(summary: dict[str, Any]) -> str | None:
    """The ``icd eval`` command that measures this run's setting against the zero-shot student (the
    first pass above already sees demos, so it is no zero-shot baseline)."""
    from icdistill.run_args import config_flags

    cfg = summary.get("config")
    if not cfg:
        return None
    grid = ["--methods", "student-zero-shot,icd", "--budgets", str(cfg["budget"]), "--seeds", str(cfg["seed"])]
    args = ["--dataset", cfg["dataset"], *config_flags(cfg, skip=("dataset", "budget", "seed", "pool", "shard")), *grid]
    return "icd eval " + shlex.join(args)


def print_summary(summary: dict[str, Any], out: str | Path, console: Console) -> None:
    table = Table(title=f"ICD run: {out}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("queries", summary["n_queries"]),
        ("accuracy", summary["accuracy"]),
        ("student accuracy before teacher (first pass, with demos)", summary["first_pass_accuracy"]),
        ("teacher calls", summary["teacher_calls"]),
        ("teacher-call rate", f"{summary['teacher_call_rate']:.1%}"),
        ("calls the gate chose (not warm-up or pacing)", summary.get("gate_chosen_calls")),
        ("teacher label accuracy (its answers = labels)", summary.get("teacher_label_accuracy")),
        ("rejected annotations", summary["rejected_annotations"]),
        ("teacher failures", summary["teacher_failures"]),
        ("pool size", summary["pool_size"]),
        ("demonstration accuracy", summary["demonstration_accuracy"]),
        ("first answer = nearest demo's answer", summary.get("first_answer_is_nearest_demo")),
        ("skipped inputs", summary["skipped_inputs"]),
        ("teacher cost (USD)", summary["teacher_usage"]["cost_usd"]),
        ("teacher faults (retried)", summary["teacher_usage"]["faults"]),
        ("student seconds", summary["student_seconds"]),
        ("teacher seconds", summary["teacher_seconds"]),
        ("seconds / query", summary["seconds_per_query"]),
    ]
    scales = {"options": "option questions, entropy 0-1", "open": "open answers, token entropy in nats"}
    for kind, mean in (summary.get("mean_uncertainty_by_kind") or {}).items():
        rows.append((f"mean uncertainty ({scales.get(kind, kind)})", mean))
    for name, value in rows:
        table.add_row(name, _fmt(value))
    console.print(table)
    print_groups(summary, console)
    skipped = summary.get("skipped_first") or []
    if skipped:
        console.print(f"skipped inputs (first {len(skipped)} of {summary['skipped_inputs']}):", soft_wrap=True)
        for s in skipped:
            console.print(f"  position {s['position']}: {s['error']}", markup=False, soft_wrap=True)
    warning = teacher_warning(summary)
    if warning:
        console.print(f"warning: {warning}", style="yellow", markup=False, soft_wrap=True)
    hint = eval_hint(summary)
    if hint:
        console.print(
            "did ICD help? the first pass above already sees demos; for the zero-shot student run:",
            soft_wrap=True,
        )
        console.print(f"  {hint}", markup=False, soft_wrap=True, highlight=False)
    console.print(f"log: {Path(out) / 'log.jsonl'}")
    console.print(f"summary: {Path(out) / 'summary.json'}")
    # a shared pool lives in PostgreSQL, not in the run folder
    console.print(f"pool: {summary.get('pool_location') or Path(out) / 'pool.sqlite'}", soft_wrap=True)


WORST_LABELS = 5


def print_groups(summary: dict[str, Any], console: Console) -> None:
    """Per question kind (when the stream mixes them) and the worst labels, and a warning for each
    label the stream keeps meeting that never entered the pool: an average can hide a class."""
    kinds = summary.get("per_kind") or {}
    labels = summary.get("per_label") or {}
    groups = [(f"kind: {k}", v) for k, v in kinds.items()] if len(kinds) > 1 else []
    worst = sorted(labels.items(), key=lambda kv: (kv[1]["accuracy"] if kv[1]["accuracy"] is not None else 2, kv[0]))
    groups += [(f"label: {k}", v) for k, v in worst[:WORST_LABELS]]
    if groups:
        title = "worst labels" + (f" ({WORST_LABELS} of {len(labels)})" if len(labels) > WORST_LABELS else "")
        table = Table(title=title + (" and question kinds" if len(kinds) > 1 else ""), show_header=True)
        for col in ("group", "queries", "accuracy", "first pass", "not asked", "teacher calls"):
            # a group's name stays on one line (an 80-column pipe wraps the numbers' headers instead)
            table.add_column(col, justify="left" if col == "group" else "right", no_wrap=col == "group")
        for name, g in groups:
            table.add_row(
                name,
                str(g["n"]),
                _fmt(g["accuracy"]),
                _fmt(g["first_pass_accuracy"]),
                _fmt(g["student_only_accuracy"]),
                str(g["teacher_calls"]),
            )
        console.print(table)
    hint = eval_hint(summary) or "icd eval --methods student-zero-shot,icd"
    for label, n in (summary.get("never_pooled_labels") or {}).items():
        console.print(
            f"[yellow]warning:[/yellow] label {label!r} came {n} times but never entered the pool: its queries "
            "only had demos of other labels (per-label figures in summary.json; compare with the student "
            f"alone: {escape(hint)})",
            soft_wrap=True,
        )


