"""What a user sees of a run: a live progress bar and a summary table."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
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
    state = {"task": None, "n": 0, "correct": 0, "labelled": 0, "calls": 0, "pool": 0}

    def on_start(start: int, total: int) -> None:
        state["task"] = progress.add_task("icd", total=total, completed=start, stats="")

    def on_record(rec: dict[str, Any]) -> None:
        if rec.get("event") == "query":
            state["n"] += 1
            if rec.get("correct") is not None:
                state["labelled"] += 1
                state["correct"] += int(rec["correct"])
            state["calls"] += int(rec["teacher_asked"])
            state["pool"] = rec["pool_size"]
        acc = state["correct"] / state["labelled"] if state["labelled"] else 0.0
        rate = state["calls"] / state["n"] if state["n"] else 0.0
        stats = f"acc {acc:.3f}  teacher {state['calls']} ({rate:.1%})  pool {state['pool']}"
        if state["task"] is not None:
            progress.update(state["task"], advance=1, stats=stats)  # type: ignore[arg-type]

    with progress:
        yield on_start, on_record


def print_summary(summary: dict[str, Any], out: str | Path, console: Console) -> None:
    table = Table(title=f"ICD run: {out}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("queries", summary["n_queries"]),
        ("accuracy", summary["accuracy"]),
        ("student accuracy before teacher (first pass)", summary["first_pass_accuracy"]),
        ("teacher calls", summary["teacher_calls"]),
        ("teacher-call rate", f"{summary['teacher_call_rate']:.1%}"),
        ("calls the gate chose (not warm-up or pacing)", summary.get("gate_chosen_calls")),
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
    for name, value in rows:
        table.add_row(name, _fmt(value))
    console.print(table)
    print_groups(summary, console)
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
            table.add_column(col, justify="left" if col == "group" else "right")
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
    for label, n in (summary.get("never_pooled_labels") or {}).items():
        console.print(
            f"[yellow]warning:[/yellow] label {label!r} came {n} times but never entered the pool: its queries "
            "only had demos of other labels (per-label figures in summary.json; compare with the student "
            "alone: icd eval --methods student-zero-shot,icd)",
            soft_wrap=True,
        )


def plot_run(records: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Running accuracy (ICD and the student's first pass) and cumulative teacher calls along the stream."""
    qs = [r for r in records if r.get("event") == "query" and r.get("correct") is not None]
    if not qs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pos = np.array([r["position"] for r in qs])
    n = np.arange(1, len(qs) + 1)
    acc = np.cumsum([r["correct"] for r in qs]) / n
    first = np.cumsum([r["first_correct"] for r in qs]) / n
    calls = np.cumsum([r["teacher_asked"] for r in qs])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(pos, acc, label="accuracy (ICD answer)")
    ax.plot(pos, first, label="accuracy (student before teacher)", alpha=0.7)
    ax.set_xlabel("stream position")
    ax.set_ylabel("running accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(pos, calls, color="tab:red", linestyle="--", label="teacher calls")
    ax2.set_ylabel("teacher calls (cumulative)")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="lower right", fontsize=8)
    ax.set_title(f"ICD run: {len(qs)} queries, {int(calls[-1])} teacher calls")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
