"""The eval's result rows, grouped: per method x budget (``Group``), the spread of a value over seeds,
each series' label, and where a cell's log is."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Group = tuple[str, float | None]


def _groups(rows: Sequence[dict[str, Any]]) -> dict[Group, list[dict[str, Any]]]:
    out: dict[Group, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[(r["method"], r["budget"])].append(r)
    return dict(out)


def spread(values: Sequence[float | None]) -> dict[str, float] | None:
    """Median, min and max of the values that exist; None when none do."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": float(len(xs))}


def _budget(b: float | None) -> str:
    return "-" if b is None else f"{b:.0%}" if b * 100 == int(b * 100) else f"{b:.1%}"


def series_label(method: str, budget: float | None) -> str:
    """``icd @ 5%``; a budget-free method is its name alone (no ``student-zero-shot -``)."""
    return method if budget is None else f"{method} @ {_budget(budget)}"


def _cell_log(out: Path, method: str, budget: float | None, seed: int) -> Path:
    from icdistill.eval.cells import Cell
    from icdistill.eval.methods import parse_method

    return out / Cell(parse_method(method), budget, seed).path / "log.jsonl"
