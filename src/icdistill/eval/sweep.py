"""Experiments: many ICD runs over seeds (stream orders) sharing one set of loaded models, with medians and spread."""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from icdistill.models.registry import ModelContext, resolve_teacher
from icdistill.runner import Parts, RunConfig, build_parts, run_icd

METRICS = (
    "accuracy",
    "teacher_call_rate",
    "demonstration_accuracy",
    "seconds_per_query",
    "first_pass_accuracy",
)


@dataclass(frozen=True)
class Arm:
    """One setting of an experiment: a name and the config changes it makes to the base."""

    name: str
    changes: dict[str, Any]


def _stats(xs: list[float]) -> dict[str, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def run_sweep(
    base: RunConfig,
    arms: Sequence[Arm],
    seeds: Sequence[int],
    *,
    out_dir: str | Path | None = None,
    ctx: ModelContext | None = None,
    parts: Parts | None = None,
    on_run: Callable[[str, int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every arm for every seed; models are resolved once per distinct spec through ``ctx``
    (or ``parts`` is used for every run, e.g. fakes in tests)."""
    ctx = ctx or ModelContext(seed=base.seed)
    parts_cache: dict[tuple[str, str, str], Parts] = {}
    results: dict[str, Any] = {"base": asdict(base), "seeds": list(seeds), "arms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out_dir) if out_dir else Path(tmp)
        for arm in arms:
            runs = []
            for seed in seeds:
                cfg = replace(base, **arm.changes, seed=seed)
                run_parts = parts
                if run_parts is None:
                    key = (cfg.student, cfg.teacher, cfg.embedder)
                    if key not in parts_cache:
                        parts_cache[key] = build_parts(cfg, ctx)
                    run_parts = parts_cache[key]
                    # a fresh teacher per run keeps the reference noise draws independent of run order
                    if cfg.teacher.startswith("reference"):
                        run_parts = replace(
                            run_parts, teacher=resolve_teacher(cfg.teacher, ModelContext(seed=seed))
                        )
                summary = run_icd(cfg, root / f"{arm.name}-seed{seed}", parts=run_parts)
                runs.append({k: summary[k] for k in (*METRICS, "teacher_calls", "pool_size", "n_queries")})
                if on_run is not None:
                    on_run(arm.name, seed, summary)
            results["arms"][arm.name] = {
                "changes": arm.changes,
                "runs": runs,
                **{m: _stats([r[m] for r in runs]) for m in METRICS},
            }
    return results


def save_results(results: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2))


def markdown_table(results: dict[str, Any], baseline: str | None = None) -> str:
    """A table of medians [min-max] per arm; with ``baseline``, accuracy as a ratio to it as well."""
    head = "| arm | accuracy (median [min-max]) | teacher-call rate | demo accuracy | s/query |"
    sep = "|---|---|---|---|---|"
    if baseline:
        head += f" accuracy / {baseline} |"
        sep += "---|"
    lines = [head, sep]
    base_acc = results["arms"].get(baseline, {}).get("accuracy", {}).get("median") if baseline else None

    def cell(s: dict[str, float | None], pct: bool = False) -> str:
        if s["median"] is None:
            return "-"
        f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.3f}")
        return f"{f(s['median'])} [{f(s['min'])}-{f(s['max'])}]"

    for name, arm in results["arms"].items():
        row = (
            f"| {name} | {cell(arm['accuracy'])} | {cell(arm['teacher_call_rate'], pct=True)} | "
            f"{cell(arm['demonstration_accuracy'])} | {arm['seconds_per_query']['median']:.2f} |"
        )
        if baseline:
            ratio = arm["accuracy"]["median"] / base_acc if base_acc else None
            row += f" {ratio:.2f}x |" if ratio is not None else " - |"
        lines.append(row)
    return "\n".join(lines)


def plot_tradeoff(
    results: dict[str, Any], path: str | Path, title: str = "ICD: accuracy vs teacher-call rate"
) -> None:
    """Accuracy against teacher-call rate, one point per arm (median) with min-max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, arm in results["arms"].items():
        x, y = arm["teacher_call_rate"], arm["accuracy"]
        if y["median"] is None:
            continue
        ax.errorbar(
            100 * x["median"],
            y["median"],
            yerr=[[y["median"] - y["min"]], [y["max"] - y["median"]]],
            xerr=[[100 * (x["median"] - x["min"])], [100 * (x["max"] - x["median"])]],
            fmt="o",
            capsize=3,
            label=name,
        )
    ax.set_xlabel("teacher-call rate (%)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
