"""What a finished run writes beside its log: the summary's details (skipped inputs, uncertainty per
kind of question) and ``run.png`` (running accuracy and teacher calls along the stream)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SKIPPED_SHOWN = 5  # skipped inputs named in the summary (all are in log.jsonl)


def summary_details(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What the summary names beyond the counts: the first skipped inputs with their reasons, and the
    mean uncertainty per kind of question (two scales: normalised option entropy in [0, 1], and the
    mean token entropy of open answers in nats, unbounded)."""
    skipped = [r for r in records if r.get("event") == "bad_input"]
    qs = [r for r in records if r.get("event") == "query"]
    by_kind: dict[str, list[float]] = {}
    for r in qs:
        by_kind.setdefault(r.get("ctx_kind") or "options", []).append(r["uncertainty"])
    return {
        "skipped_first": [
            {"position": r.get("position"), "error": r.get("error")} for r in skipped[:SKIPPED_SHOWN]
        ],
        "mean_uncertainty_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
    }


def plot_run(records: list[dict[str, Any]], path: str | Path, what: str = "ICD run") -> Path | None:
    """Running accuracy (the final answers and the student's first pass) and cumulative teacher calls
    along the stream, failed calls apart; ``what`` names the run in the title (an eval cell: its
    method, budget and seed)."""
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
    failed = np.cumsum([bool(r["teacher_asked"] and r.get("teacher_error")) for r in qs])
    icd = what == "ICD run"
    fig, ax = plt.subplots(figsize=(7, 4))
    from matplotlib.ticker import MaxNLocator

    ax.plot(pos, acc, label="accuracy (ICD answer)" if icd else "accuracy (final answers)")
    if not np.array_equal(acc, first):
        # the first pass already sees the pool's demos: the zero-shot student is `icd eval`'s baseline
        with_demos = any(r.get("demo_ids") for r in qs)
        if icd:
            label = "accuracy (student's first pass" + (", with demos)" if with_demos else ")")
        else:  # a baseline's first answer may be no student's (a k-NN vote)
            label = "accuracy (first answer, before any teacher call)"
        ax.plot(pos, first, label=label, alpha=0.7)
    ax.set_xlabel("stream position")
    ax.set_ylabel("running accuracy")
    ax.set_ylim(-0.03, 1.03)  # a line at 0 or 1 stays visible inside the frame
    ax.grid(alpha=0.3)
    lines = list(ax.get_lines())
    if calls[-1]:  # no teacher call (the student alone): no axis of zeros
        ax2 = ax.twinx()
        ax2.plot(pos, calls, color="tab:red", linestyle="--", label="teacher calls")
        if failed[-1]:
            ax2.plot(pos, failed, color="black", linestyle=":", label="failed teacher calls (no answer)")
        ax2.set_ylabel("teacher calls (cumulative)")
        ax2.set_ylim(bottom=0)
        ax2.yaxis.set_major_locator(MaxNLocator(integer=True))  # calls are whole numbers
        lines += ax2.get_lines()
    # below the axes: over no line
    ax.legend(
        lines,
        [str(line.get_label()) for line in lines],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    title = f"{what}: {len(qs)} queries, {int(calls[-1])} teacher calls"
    all_failed = bool(failed[-1]) and failed[-1] == calls[-1]
    if all_failed:
        title += f"\nall {int(calls[-1])} teacher calls FAILED: no teacher answer was pooled"
    elif failed[-1]:
        title += f", {int(failed[-1])} failed"
    ax.set_title(title, color="tab:red" if all_failed else "black", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
