"""The eval report's plots: accuracy vs achieved teacher-call rate, running first-pass accuracy along the
stream, uncertainty reliability, per-class accuracy."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icdistill.eval.rows import _cell_log, _groups, series_label, spread
from icdistill.runlog import read_records


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ((0, (1, 1)), "P")]


def merge_identical(series: Sequence[tuple[str, Any]]) -> tuple[list[tuple[str, Any]], list[str]]:
    """Series with equal data drawn once, labelled ``a = b``, so one cannot hide the other unseen;
    returns the series and a note per merge."""
    merged: list[tuple[list[str], Any]] = []
    for label, data in series:
        for labels, d in merged:
            if d == data:
                labels.append(label)
                break
        else:
            merged.append(([label], data))
    notes = [f"{', '.join(ls)} coincide (drawn as one line)" for ls, _ in merged if len(ls) > 1]
    return [(" = ".join(ls), d) for ls, d in merged], notes


def plot_tradeoff(rows: Sequence[dict[str, Any]], out: Path, path: Path) -> list[str]:
    """One line per method through its budgets (median, min-max bars); budget-free methods as points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[tuple[float, dict[str, float], dict[str, float]]]] = defaultdict(list)
    for (method, _), rs in _groups(rows).items():
        x = spread([r["teacher_call_rate"] for r in rs])
        y = spread([r["accuracy"] for r in rs])
        if x is None or y is None:
            continue
        by_method[method].append((x["median"], x, y))
    series = []
    for method, pts in by_method.items():
        pts.sort(key=lambda p: p[0])
        series.append((method, [(p[1], p[2]) for p in pts]))
    series, notes = merge_identical(series)
    for i, (label, pts) in enumerate(series):
        line, marker = _STYLES[i % len(_STYLES)]
        xs = [100 * x["median"] for x, _ in pts]
        ys = [y["median"] for _, y in pts]
        yerr = [[y["median"] - y["min"] for _, y in pts], [y["max"] - y["median"] for _, y in pts]]
        xerr = [
            [100 * (x["median"] - x["min"]) for x, _ in pts],
            [100 * (x["max"] - x["median"]) for x, _ in pts],
        ]
        ax.errorbar(
            xs,
            ys,
            yerr=yerr,
            xerr=xerr,
            linestyle=line if len(pts) > 1 else "none",
            marker=marker,
            capsize=3,
            label=label,
            alpha=0.85,
        )
    ax.set_xscale("symlog", linthresh=1.0)
    _rate_ticks(ax, [100 * x["median"] for _, pts in series for x, _ in pts])
    ax.set_xlabel("achieved teacher-call rate (%, symlog; ticks at the rates achieved)")
    ax.set_ylabel("accuracy (final answers)")
    ax.set_title("accuracy vs teacher-call rate (median, min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return notes


def _rate_ticks(ax: Any, rates: Sequence[float]) -> None:
    """x ticks at the achieved rates (medians, in %), not symlog's "0" and "10^0" alone: a 4.7% rate
    can be read off the axis. Rates that would print alike are ticked once."""
    from matplotlib.ticker import NullLocator

    labels: dict[str, float] = {}
    for r in sorted(rates):
        labels.setdefault(_pct(r), r)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(list(labels.values()), list(labels), fontsize=7, rotation=45)


def _pct(r: float) -> str:
    return f"{r:.0f}%" if r == 0 or r >= 10 else f"{r:.1f}%"


def _running(records: Sequence[dict[str, Any]], field: str = "first_correct") -> list[float]:
    correct = total = 0
    out = []
    for r in records:
        if r.get("event") != "query" or r.get(field) is None:
            continue
        total += 1
        correct += int(bool(r[field]))
        out.append(correct / total)
    return out


# the student of these methods only abstains: its first pass is not an answer
_NO_FIRST_PASS = ("teacher-zero-shot",)


def plot_running(rows: Sequence[dict[str, Any]], out: Path, path: Path) -> list[str]:
    """Running first-pass accuracy along the stream (the student's answers before any teacher call:
    the warm-up, answered by the teacher, does not start every line at 1.0), one line per method x
    budget, median over seeds (as the tables)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = []
    for (method, budget), rs in _groups(rows).items():
        if method.split(":")[0] in _NO_FIRST_PASS:
            continue
        curves = []
        for r in rs:
            log = _cell_log(out, method, budget, r["seed"])
            if log.exists():
                curves.append(_running(read_records(log)))
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        series.append(
            (series_label(method, budget), [statistics.median(c[i] for c in curves) for i in range(n)])
        )
    series, notes = merge_identical(series)
    for i, (label, median) in enumerate(series):
        line, _ = _STYLES[i % len(_STYLES)]
        ax.plot(range(1, len(median) + 1), median, linestyle=line, label=label, alpha=0.85)
    ax.set_xlabel("queries seen")
    ax.set_ylabel("running first-pass accuracy (median over seeds)")
    left_out = sorted({m for m, _ in _groups(rows) if m.split(":")[0] in _NO_FIRST_PASS})
    why = f" ({', '.join(left_out)}: no first pass, not drawn)" if left_out else ""
    ax.set_title(f"the student's answers before any teacher call{why}", fontsize=9)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return notes


def plot_reliability(rows: Sequence[dict[str, Any]], out: Path, path: Path) -> list[str]:
    """First-pass accuracy per uncertainty quintile (pooled over seeds), AUROC in the legend; a cell
    whose uncertainty is constant (it ranks nothing) has no curve."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = []
    skipped = []
    for (method, budget), rs in _groups(rows).items():
        bins = [r.get("reliability") or [] for r in rs]
        if not any(bins):
            skipped.append(series_label(method, budget))
            continue
        k = min(len(b) for b in bins if b)
        acc = [statistics.fmean(b[i]["accuracy"] for b in bins if b) for i in range(k)]
        au = spread([r["auroc"] for r in rs])
        label = series_label(method, budget) + (f" (AUROC {au['median']:.2f})" if au else "")
        series.append((label, acc))
    series, notes = merge_identical(series)
    for i, (label, acc) in enumerate(series):
        line, marker = _STYLES[i % len(_STYLES)]
        ax.plot(range(1, len(acc) + 1), acc, linestyle=line, marker=marker, label=label, alpha=0.85)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("uncertainty quintile (1 = most certain)")
    ax.set_ylabel("first-pass accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    if skipped:
        notes.append(f"no uncertainty curve (constant uncertainty, or nothing to rank): {', '.join(skipped)}")
    return notes


# the methods of the per-class plot, in this order (each at its budgets), whichever of them ran
_PER_CLASS = ("student-zero-shot", "icd", "knn-pool")


def plot_per_class(res: dict[str, Any], path: Path) -> None:
    """Grouped bars per label: student-zero-shot, icd and knn-pool (final answers), whichever ran."""
    plt = _plt()
    first_raw: dict[str, str] = {}  # each method name's first listed variant
    for c in res["columns"]:
        raw = c.split(" @ ")[0]
        if not c.endswith(" first pass") and raw.split(":")[0] in _PER_CLASS:
            first_raw.setdefault(raw.split(":")[0], raw)
    cols = [
        c for c in res["columns"] if not c.endswith(" first pass") and c.split(" @ ")[0] in first_raw.values()
    ]
    cols.sort(key=lambda c: _PER_CLASS.index(c.split(":")[0].split(" @ ")[0]))
    labels = list(res["groups"])
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(labels) * max(1, len(cols)) / 2), 4.5))
    width = 0.8 / max(1, len(cols))
    for j, col in enumerate(cols):
        ys = [res["groups"][g].get(col) for g in labels]
        xs = [i + (j - (len(cols) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(
            [x for x, y in zip(xs, ys, strict=True) if y is not None],
            [y for y in ys if y is not None],
            width=width,
            label=col,
        )
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"{g}\n({res['groups'][g]['n']:g})" for g in labels], fontsize=7, rotation=30)
    ax.set_ylabel("accuracy (median over seeds)")
    ax.set_ylim(0, 1.05)
    ax.set_title("per class (queries per stream in brackets)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    if cols:
        # beside the axes, not over the bars (a class near 1.0 reaches the top wherever it stands)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
