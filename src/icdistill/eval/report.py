"""The eval report: medians [min-max] over seeds per method x budget, paired differences, and plots
(accuracy vs achieved teacher-call rate, running accuracy along the stream, uncertainty reliability)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icdistill.runlog import read_records

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


def _cell(values: Sequence[float | None], pct: bool = False, digits: int = 3) -> str:
    s = spread(values)
    if s is None:
        return "-"

    def f(v: float) -> str:
        return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"

    if s["min"] == s["max"]:
        return f(s["median"])
    return f"{f(s['median'])} [{f(s['min'])}-{f(s['max'])}]"


def _budget(b: float | None) -> str:
    return "-" if b is None else f"{b:.0%}" if b * 100 == int(b * 100) else f"{b:.1%}"


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per method x budget, medians [min-max] over seeds."""
    open_answers = any(r.get("exact_match") is not None for r in rows)
    head = [
        "method",
        "budget",
        "seeds",
        "accuracy",
        "teacher-call rate",
        "teacher calls",
        "demo accuracy",
        "AUROC (uncertainty vs error)",
        "s/query",
        "cost USD",
    ]
    if open_answers:
        head += ["exact match", "token F1", "BLEU", "chrF"]
    if any(r.get("train_seconds") is not None for r in rows):
        head += ["train s", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, budget), rs in _groups(rows).items():
        cells = [
            method,
            _budget(budget),
            str(len(rs)),
            _cell([r["accuracy"] for r in rs]),
            _cell([r["teacher_call_rate"] for r in rs], pct=True),
            _cell([r["teacher_calls"] for r in rs], digits=0),
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


def paired_table(rows: Sequence[dict[str, Any]], reference: str) -> str:
    """Markdown: accuracy of each method minus ``reference`` on the same seed (and budget, where both
    have one), median [min-max] over seeds. Positive = better than the reference."""
    by_key = {(r["method"], r["budget"], r["seed"]): r for r in rows}
    ref_rows = [r for r in rows if r["method"] == reference]
    if not ref_rows:
        return ""
    lines = [
        f"| method | budget | accuracy - {reference} (same seed) | wins / seeds |",
        "|---|---|---|---|",
    ]
    for (method, budget), rs in _groups(rows).items():
        if method == reference:
            continue
        diffs = []
        for r in rs:
            ref = by_key.get((reference, budget, r["seed"]))
            if ref is None:
                ref = by_key.get((reference, None, r["seed"]))
            if ref is None:
                # a budget-free method against each budget of the reference: compare with the first
                ref = next((x for x in ref_rows if x["seed"] == r["seed"]), None)
            if ref is not None and r["accuracy"] is not None and ref["accuracy"] is not None:
                diffs.append(r["accuracy"] - ref["accuracy"])
        if diffs:
            wins = sum(d > 0 for d in diffs)
            lines.append(f"| {method} | {_budget(budget)} | {_cell(diffs)} | {wins} / {len(diffs)} |")
    return "\n".join(lines)


def write_report(rows: Sequence[dict[str, Any]], cfg: Any, out: Path) -> None:
    """report.md and the three plots in ``out``."""
    base = cfg.base
    parts = [
        "# icd eval report",
        "",
        f"Dataset `{base.dataset}` ({base.split}), {base.n} queries per stream, seeds "
        f"{', '.join(map(str, cfg.seeds))} (a seed is a stream order), student `{base.student}`, "
        f"teacher `{base.teacher}`, embedder `{base.embedder}`. Medians over seeds with [min-max].",
        "",
        summary_table(rows),
        "",
    ]
    reference = next((r["method"] for r in rows if r["method"].split(":")[0] == "icd"), None)
    if reference:
        parts += [
            f"Paired against `{reference}` on the same stream order (a budget-free method against "
            f"`{reference}` at its first budget):",
            "",
            paired_table(rows, reference),
            "",
        ]
    plots = [
        ("tradeoff.png", "accuracy vs achieved teacher-call rate", plot_tradeoff),
        ("running.png", "running accuracy along the stream", plot_running),
        ("reliability.png", "accuracy by uncertainty bin (first pass)", plot_reliability),
    ]
    for name, title, fn in plots:
        fn(rows, out, out / name)
        parts.append(f"![{title}]({name})")
    (out / "report.md").write_text("\n".join(parts) + "\n", encoding="utf-8")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(rows: Sequence[dict[str, Any]], out: Path, path: Path) -> None:
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
    for method, pts in by_method.items():
        pts.sort(key=lambda p: p[0])
        xs = [100 * p[1]["median"] for p in pts]
        ys = [p[2]["median"] for p in pts]
        yerr = [[p[2]["median"] - p[2]["min"] for p in pts], [p[2]["max"] - p[2]["median"] for p in pts]]
        xerr = [
            [100 * (p[1]["median"] - p[1]["min"]) for p in pts],
            [100 * (p[1]["max"] - p[1]["median"]) for p in pts],
        ]
        ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, fmt="o-" if len(pts) > 1 else "s", capsize=3, label=method)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("achieved teacher-call rate (%, symlog)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs teacher-call rate (median, min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _running(records: Sequence[dict[str, Any]]) -> list[float]:
    correct = total = 0
    out = []
    for r in records:
        if r.get("event") != "query" or r.get("correct") is None:
            continue
        total += 1
        correct += int(bool(r["correct"]))
        out.append(correct / total)
    return out


def plot_running(rows: Sequence[dict[str, Any]], out: Path, path: Path) -> None:
    """Running accuracy along the stream, one line per method x budget (mean over seeds)."""
    from icdistill.eval.harness import Cell
    from icdistill.eval.methods import parse_method

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, budget), rs in _groups(rows).items():
        curves = []
        for r in rs:
            log = out / Cell(parse_method(method), budget, r["seed"]).path / "log.jsonl"
            if log.exists():
                curves.append(_running(read_records(log)))
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        ax.plot(range(1, n + 1), mean, label=f"{method} {_budget(budget)}")
    ax.set_xlabel("queries seen")
    ax.set_ylabel("running accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(rows: Sequence[dict[str, Any]], out: Path, path: Path) -> None:
    """First-pass accuracy per uncertainty quintile (pooled over seeds), AUROC in the legend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, budget), rs in _groups(rows).items():
        bins = [r.get("reliability") or [] for r in rs]
        if not any(bins):
            continue
        k = min(len(b) for b in bins if b)
        acc = [statistics.fmean(b[i]["accuracy"] for b in bins if b) for i in range(k)]
        au = spread([r["auroc"] for r in rs])
        label = f"{method} {_budget(budget)}" + (f" (AUROC {au['median']:.2f})" if au else "")
        ax.plot(range(1, k + 1), acc, "o-", label=label)
    ax.set_xlabel("uncertainty quintile (1 = most certain)")
    ax.set_ylabel("first-pass accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
