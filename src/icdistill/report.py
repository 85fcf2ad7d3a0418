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
        ("rejected annotations", summary["rejected_annotations"]),
        ("teacher failures", summary["teacher_failures"]),
        ("pool size", summary["pool_size"]),
        ("demonstration accuracy", summary["demonstration_accuracy"]),
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
    console.print(
        f"log: {Path(out) / 'log.jsonl'}   summary: {Path(out) / 'summary.json'}   pool: {Path(out) / 'pool.sqlite'}"
    )
