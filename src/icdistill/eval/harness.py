"""``icd eval``: every method x budget x seed on the same stream orders, models loaded once, resumable.

Each cell is an ordinary ICD run in ``out/cells/<method>/<budget>/<seed>/`` (log, pool, summary), so
a killed cell continues where it stopped and a finished one is never redone. ``results.csv`` has a
row per cell; ``report.md`` and the plots are rebuilt from those rows.
"""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from icdistill.data.dataset import Dataset
from icdistill.data.stream import load_dataset, stream_order
from icdistill.errors import ICDError
from icdistill.eval.cells import Cell, reference_method
from icdistill.eval.gates import FixedCountRandomGate
from icdistill.eval.methods import METHODS, MethodSpec, parse_method
from icdistill.eval.scores import cell_scores, query_breakdown
from icdistill.models.registry import ModelContext, resolve_teacher
from icdistill.run_summary import plot_run
from icdistill.runlog import read_records, write_json_atomic
from icdistill.runner import Parts, RunConfig, build_parts, query_stream, run_icd

COLUMNS = (
    "method",
    "budget",
    "seed",
    "n",
    "accuracy",
    "teacher_call_rate",
    "teacher_calls",
    "rejected_annotations",
    "teacher_failures",
    "demonstration_accuracy",
    "first_pass_accuracy",
    "unasked_accuracy",
    "gate_chosen_calls",
    "forced_calls",
    "matched_calls",
    "auroc",
    "gate_auroc",
    "seconds_per_query",
    "student_seconds_per_query",
    "teacher_seconds_per_query",
    "cost_usd",
    "pool_size",
    "self_labels",
    "exact_match",
    "token_f1",
    "bleu",
    "chrf",
    "train_seconds",
    "peak_rss_mb",
    "image_embed_seconds",
    "error",  # a cell that failed (an error, or no result within its timeout): why; its other columns empty
)


@dataclass(frozen=True)
class EvalConfig:
    """An evaluation grid. ``base`` holds the models, the dataset and the loop options every method starts from."""

    base: RunConfig = field(default_factory=RunConfig)
    methods: tuple[str, ...] = ("student-zero-shot", "icd", "knn-pool")
    budgets: tuple[float, ...] = (0.05,)
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ICDError("--methods is empty")
        if not self.seeds:
            raise ICDError("--seeds is empty")
        if len(set(self.seeds)) != len(self.seeds):
            raise ICDError("--seeds has a seed twice")
        specs = [parse_method(m) for m in self.methods]
        if len({s.raw for s in specs}) != len(specs):
            raise ICDError("a method is given twice")
        if any(METHODS[s.name].uses_budget for s in specs):
            if not self.budgets:
                raise ICDError("--budgets is empty but a gated method needs a budget")
            for b in self.budgets:
                if not 0 < b <= 1:
                    raise ICDError(f"--budgets are teacher-call rates in (0, 1], got {b}")
            if len(set(self.budgets)) != len(self.budgets):
                raise ICDError("--budgets has a budget twice")

    def specs(self) -> list[MethodSpec]:
        return [parse_method(m) for m in self.methods]

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": asdict(self.base),
            "methods": list(self.methods),
            "budgets": list(self.budgets),
            "seeds": list(self.seeds),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        return cls(
            base=RunConfig.from_dict(d["base"]),
            methods=tuple(d["methods"]),
            budgets=tuple(float(b) for b in d["budgets"]),
            seeds=tuple(int(s) for s in d["seeds"]),
        )


def _matches_calls(spec: MethodSpec) -> bool:
    return spec.name == "icd-random-gate" and spec.options.get("calls", "match") == "match"


def plan(cfg: EvalConfig) -> list[Cell]:
    """All cells, seed-major so that every method's first seed finishes before any second seed; an
    ``icd-random-gate`` that matches ``icd``'s call count comes after that ``icd`` in its seed."""
    cells = []
    specs = cfg.specs()
    if reference_method(cfg.methods) is not None:
        specs = [s for s in specs if not _matches_calls(s)] + [s for s in specs if _matches_calls(s)]
    for seed in cfg.seeds:
        for spec in specs:
            budgets: Sequence[float | None] = cfg.budgets if METHODS[spec.name].uses_budget else (None,)
            cells.extend(Cell(spec, b, seed) for b in budgets)
    return cells


def refusals(cfg: EvalConfig) -> list[str]:
    """Why methods cannot run with this config (checked before anything runs)."""
    out = []
    for spec in cfg.specs():
        method = METHODS[spec.name]
        run_cfg = method.run_config(cfg.base, spec, cfg.budgets[0] if cfg.budgets else None, cfg.seeds[0])
        why = method.refusal(run_cfg)
        if why:
            out.append(f"{spec.raw}: {why}")
    return out


def _prepare_out(cfg: EvalConfig, out: Path, resume: bool) -> EvalConfig:
    stored = out / "eval.json"
    if resume:
        if not stored.exists():
            raise ICDError(f"nothing to resume in {out}: no eval.json")
        try:
            return EvalConfig.from_dict(json.loads(stored.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ICDError(f"cannot read {stored}: {e}") from e
    if out.exists() and not out.is_dir():
        raise ICDError(f"--out {out} is a file, not a folder")
    if stored.exists() or (out / "cells").exists():
        raise ICDError(f"{out} already holds an eval; pass --resume to continue it or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ICDError(f"cannot create --out {out}: {e}") from e
    # the dataset stored absolute, as ``icd run`` stores it: ``--resume`` from another folder finds it
    cfg = replace(cfg, base=cfg.base.with_absolute_paths())
    write_json_atomic(stored, cfg.to_dict())
    return cfg


class _PartsCache:
    """Models loaded once per process, shared by every cell that uses the same specs."""

    def __init__(self, ctx: ModelContext, injected: Parts | None) -> None:
        self.ctx = ctx
        self.injected = injected
        self.cache: dict[tuple[str, str, str], Parts] = {}
        self.warmed: set[tuple[Any, ...]] = set()
        self.embed_seconds: dict[tuple[str, str, str], float] = {}

    def for_config(self, cfg: RunConfig) -> Parts:
        if self.injected is not None:
            return self.injected
        key = (cfg.student, cfg.teacher, cfg.embedder)
        if key not in self.cache:
            self.cache[key] = build_parts(cfg, self.ctx)
        parts = self.cache[key]
        fresh = getattr(parts.student, "fresh", None)
        if fresh is not None:
            # no state (e.g. calibration) carried over from the cells that ran before
            parts = replace(parts, student=fresh())
        if cfg.teacher.startswith("reference"):
            # a fresh reference teacher per cell: its noise draws depend on the seed, not on cell order
            parts = replace(parts, teacher=resolve_teacher(cfg.teacher, ModelContext(seed=cfg.seed)))
        return parts

    def warm(self, cfg: RunConfig, parts: Parts, dataset: Dataset) -> float | None:
        """Run every image (and prompt) of the cell's stream through the embedder once, before the cell,
        so that every cell's s/query is measured from a warm cache (the student's image tags and the
        embedder share the tagger's cache): which cell paid for the CNN no longer depends on the order
        the cells ran in. Returns the seconds per query the first warming of these models took."""
        key = (cfg.student, cfg.teacher, cfg.embedder)
        stream = (key, cfg.seed, cfg.n, cfg.shuffle)
        if stream not in self.warmed:
            order = stream_order(len(dataset), cfg.n, cfg.seed, cfg.shuffle)
            timed, t0 = 0, 0.0
            for q in query_stream(dataset, order):
                if isinstance(q, Exception):
                    continue
                parts.embedder.embed_query(q)
                if timed == 0:
                    t0 = time.perf_counter()  # the first one loads the models: not timed
                timed += 1
            self.warmed.add(stream)
            if timed > 1:
                self.embed_seconds.setdefault(key, (time.perf_counter() - t0) / (timed - 1))
        return self.embed_seconds.get(key)


def _is_open(records: Sequence[dict[str, Any]]) -> bool:
    qs = [r for r in records if r.get("event") == "query"]
    return bool(qs) and all(r.get("option_probs") is None for r in qs)


def cell_row(cell: Cell, summary: dict[str, Any], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One results.csv row from a finished cell's summary and log."""
    method = METHODS[cell.spec.name]
    n = summary["n_queries"]
    scores = cell_scores(records, open_answers=_is_open(records))
    usage = summary.get("teacher_usage", {})
    row: dict[str, Any] = {
        "method": cell.spec.raw,
        "budget": cell.budget,
        "seed": cell.seed,
        "n": n,
        "accuracy": summary.get(method.accuracy_key),
        "teacher_call_rate": summary["teacher_call_rate"],
        "teacher_calls": summary["teacher_calls"],
        "rejected_annotations": summary["rejected_annotations"],
        "teacher_failures": summary.get("teacher_failures", 0),
        "teacher_label_accuracy": summary.get("teacher_label_accuracy"),
        "teacher_label_checked": summary.get("teacher_label_checked"),
        "demonstration_accuracy": summary["demonstration_accuracy"],
        "first_pass_accuracy": summary["first_pass_accuracy"],
        "auroc": scores["auroc"],
        "gate_auroc": scores["gate_auroc"],
        "seconds_per_query": summary["seconds_per_query"],
        "student_seconds_per_query": summary["student_seconds"] / n if n else None,
        "teacher_seconds_per_query": summary["teacher_seconds"] / n if n else None,
        "cost_usd": usage.get("cost_usd", 0.0),
        "pool_size": summary["pool_size"],
        "self_labels": None,
        "exact_match": scores.get("exact_match"),
        "token_f1": scores.get("token_f1"),
        "bleu": scores.get("bleu"),
        "chrf": scores.get("chrf"),
        "train_seconds": summary.get("train_seconds"),
        "peak_rss_mb": summary.get("peak_rss_mb"),
    }
    if scores.get("exact_match") is not None and method.accuracy_key == "accuracy":
        # open answers: a right answer is a normalised exact match, not the same string
        row["accuracy"] = scores["exact_match"]
    if cell.spec.name == "self-label":
        # the "teacher" was the student itself: nothing was bought
        row["self_labels"] = summary["accepted_annotations"]
        row.update(teacher_calls=0, teacher_call_rate=0.0, teacher_seconds_per_query=0.0, cost_usd=0.0)
    breakdown = query_breakdown(records, (summary.get("config") or {}).get("demo_order", "best-last"))
    # teacher-zero-shot's student only abstains: it has no first pass
    no_first = cell.spec.name == "teacher-zero-shot"
    row["first_pass_accuracy"] = None if no_first else breakdown["first_pass_accuracy"]
    row["unasked_accuracy"] = breakdown["unasked_accuracy"]
    if method.uses_budget:
        # calls a gate chose from the uncertainty (or its random draw) vs. forced by warm-up or pacing
        row["gate_chosen_calls"] = breakdown["gate_chosen_calls"]
        row["forced_calls"] = breakdown["forced_calls"]
    else:
        row["gate_chosen_calls"] = row["forced_calls"] = None
    row["demo_accuracy_at"] = breakdown["demo_accuracy_at"]
    row["matched_calls"] = summary.get("matched_calls")
    row["image_embed_seconds"] = summary.get("image_embed_seconds")
    row["reliability"] = scores["reliability"]
    row["judge"] = summary.get("judge")  # the judge's experts (report.md), not a results.csv column
    return row


def failed_row(cell: Cell, error: str) -> dict[str, Any]:
    """The results.csv row of a cell that did not finish: which cell, and why (never a row.json:
    ``--resume`` runs it again)."""
    return {"method": cell.spec.raw, "budget": cell.budget, "seed": cell.seed, "error": error}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_cell(
    cell: Cell,
    cfg: EvalConfig,
    out: Path,
    parts_cache: _PartsCache,
    dataset: Dataset,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    write_row: bool = True,
) -> dict[str, Any]:
    """Run (or finish) one cell and return its row; a finished cell is read back, not rerun.
    ``write_row`` False: the caller stores the row (a Ray driver, from the row its actor returned)."""
    folder = out / cell.path
    done = finished_row(cell, out)
    if done is not None:
        return done
    method = METHODS[cell.spec.name]
    run_cfg = method.run_config(cfg.base, cell.spec, cell.budget, cell.seed)
    resume = (folder / "config.json").exists()
    if resume and not method.resumable:
        shutil.rmtree(folder)  # e.g. LoRA weights are not on disk: start the cell again
        resume = False
    parts = parts_cache.for_config(run_cfg)
    embed_seconds = parts_cache.warm(run_cfg, parts, dataset)
    if method.wrap is not None:
        parts = method.wrap(parts, run_cfg, cell.spec.options)
    gate = _matched_gate(cell, cfg, out, run_cfg, dataset, resume) if _matches_calls(cell.spec) else None
    summary = run_icd(
        run_cfg,
        folder,
        resume=resume,
        parts=parts,
        dataset=dataset,
        on_start=on_start,
        on_record=on_record,
        gate=gate,
    )
    if gate is not None:
        summary["matched_calls"] = gate.calls
    summary["image_embed_seconds"] = embed_seconds
    extra = getattr(parts.student, "training_stats", None)
    if callable(extra):
        summary.update(extra())
        summary["peak_rss_mb"] = _peak_rss_mb()
    records = read_records(folder / "log.jsonl")
    plot_run(records, folder / "run.png", what=cell.label())  # named for its method, not "ICD run"
    row = cell_row(cell, summary, records)
    if write_row:
        write_row_json(cell, out, row)
    return row


def _matched_gate(
    cell: Cell, cfg: EvalConfig, out: Path, run_cfg: RunConfig, dataset: Dataset, resume: bool
) -> FixedCountRandomGate | None:
    """``icd-random-gate``'s gate: as many calls as the reference ``icd`` made on the same seed and
    budget (its finished row), at random queries. The count is stored in the cell's folder, so a
    resumed cell keeps it. None (the rate-paced random gate) when no reference row is there to match,
    e.g. ``icd`` not in the grid, or running elsewhere at the same time (Ray)."""
    stored = out / cell.path / "matched_calls.json"
    n = len(stream_order(len(dataset), run_cfg.n, run_cfg.seed, run_cfg.shuffle))
    if resume and stored.exists():
        calls = int(json.loads(stored.read_text())["calls"])
    elif resume:
        return None  # it started rate-paced: it continues so
    else:
        ref = reference_method(cfg.methods)
        row = finished_row(Cell(parse_method(ref), cell.budget, cell.seed), out) if ref else None
        if row is None:
            return None
        calls = int(row["teacher_calls"])
        (out / cell.path).mkdir(parents=True, exist_ok=True)
        write_json_atomic(stored, {"calls": calls, "matched": ref, "n": n})
    return FixedCountRandomGate(calls, n, warmup=run_cfg.warmup, seed=run_cfg.seed)


def write_row_json(cell: Cell, out: Path, row: dict[str, Any]) -> None:
    """Mark a cell finished: its row, in its folder."""
    write_json_atomic(out / cell.path / "row.json", row)


def finished_row(cell: Cell, out: Path) -> dict[str, Any] | None:
    """The row of a cell that finished (its ``row.json``), or None."""
    path = out / cell.path / "row.json"
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class CellJob:
    """What running a cell needs besides the cell: the same for every cell of an eval (and every worker)."""

    cfg: EvalConfig
    out: Path
    dataset: Dataset
    parts: Parts | None = None  # injected backends (tests); None: each process builds and caches its own
    ctx: ModelContext | None = None


class CellWorker:
    """Runs cells of one eval in one process, loading each set of models once for all of them."""

    def __init__(self, job: CellJob) -> None:
        self.job = job
        self.cache = _PartsCache(job.ctx or ModelContext(seed=job.cfg.base.seed), job.parts)

    def run(
        self,
        cell: Cell,
        on_record: Callable[[dict[str, Any]], None] | None = None,
        on_start: Callable[[int, int], None] | None = None,
        write_row: bool = True,
    ) -> dict[str, Any]:
        job = self.job
        return run_cell(
            cell,
            job.cfg,
            job.out,
            self.cache,
            job.dataset,
            on_record=on_record,
            on_start=on_start,
            write_row=write_row,
        )


class CellRunner(Protocol):
    """Runs the cells of an eval somewhere; yields ``(index in cells, row)`` as each finishes, in any order
    (a ``failed_row``, with its ``error``, for a cell that failed while the others went on)."""

    def run(self, cells: Sequence[Cell], job: CellJob) -> Iterator[tuple[int, dict[str, Any]]]: ...


@dataclass
class LocalCells:
    """Every cell in this process, one after another in plan order."""

    on_cell: Callable[[int, int, Cell], None] | None = None
    on_start: Callable[[int, int], None] | None = None
    on_record: Callable[[dict[str, Any]], None] | None = None

    def run(self, cells: Sequence[Cell], job: CellJob) -> Iterator[tuple[int, dict[str, Any]]]:
        worker = CellWorker(job)
        for i, cell in enumerate(cells):
            if self.on_cell is not None:
                self.on_cell(i, len(cells), cell)
            yield i, worker.run(cell, on_record=self.on_record, on_start=self.on_start)


def write_results_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


def run_eval(
    cfg: EvalConfig,
    out: str | Path,
    *,
    resume: bool = False,
    parts: Parts | None = None,
    ctx: ModelContext | None = None,
    dataset: Dataset | None = None,
    on_cell: Callable[[int, int, Cell], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    runner: CellRunner | None = None,
    on_cell_done: Callable[[int, int, Cell], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every cell (skipping finished ones on resume); write results.csv, report.md and plots.

    ``runner`` decides where cells run (default: here, in plan order, with the progress callbacks);
    results.csv always lists the finished cells in plan order, rewritten as each one finishes.
    ``on_cell_done(done, total, cell)`` follows every finished cell; ``on_warning`` gets what the
    dataset warns about (e.g. text labels that make open questions) before any cell runs."""
    from icdistill.eval.report import write_report

    out = Path(out)
    if resume:
        cfg = _prepare_out(cfg, out, resume=True)  # the stored grid, whatever was passed
    why = refusals(cfg)
    if why:
        raise ICDError("cannot run: " + "; ".join(why))
    if not resume:
        cfg = _prepare_out(cfg, out, resume=False)
    dataset = dataset or load_dataset(cfg.base.dataset, split=cfg.base.split)
    stream_order(len(dataset), cfg.base.n, 0, cfg.base.shuffle)  # raises on an empty stream
    for warning in dataset.warnings if on_warning is not None else ():
        on_warning(warning)
    cells = plan(cfg)
    runner = runner or LocalCells(on_cell=on_cell, on_start=on_start, on_record=on_record)
    done: dict[int, dict[str, Any]] = {}
    for i, row in runner.run(cells, CellJob(cfg, out, dataset, parts, ctx)):
        done[i] = row
        write_results_csv([done[j] for j in sorted(done)], out / "results.csv")
        if on_cell_done is not None:
            on_cell_done(len(done), len(cells), cells[i])
    failed = [f"{cells[i].label()} ({row['error']})" for i, row in sorted(done.items()) if row.get("error")]
    missing = [c.label() for i, c in enumerate(cells) if i not in done]
    if failed or missing:
        why = ([f"cells failed: {'; '.join(failed)}"] if failed else []) + (
            [f"cells never finished: {', '.join(missing)}"] if missing else []
        )
        raise ICDError(f"{'; '.join(why)}; the other cells are in results.csv: continue with --resume")
    rows = [done[i] for i in range(len(cells))]
    write_report(rows, cfg, out, split=getattr(dataset, "split", None))
    return rows
