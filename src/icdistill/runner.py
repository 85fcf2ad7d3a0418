"""One ICD run from a validated config: build the parts, stream the dataset, write log, pool and summary."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from icdistill.data.stream import Dataset, load_dataset, stream_order
from icdistill.distiller import Distiller, LoopConfig
from icdistill.eval.metrics import summarize
from icdistill.gate import GATES, UNCERTAINTY, make_gate
from icdistill.models.registry import ModelContext, resolve_embedder, resolve_student, resolve_teacher
from icdistill.pool import SQLitePool
from icdistill.runlog import RunLog, write_json_atomic
from icdistill.select import SELECTORS, make_selector
from icdistill.teacher import TestTimeScaling
from icdistill.types import DataError, ICDError, Query


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run. Validated once, here; stored in the output folder for resume."""

    student: str = "local:smollm2"
    teacher: str = "reference"
    embedder: str = "local:conse"
    dataset: str = "fashion-mnist"
    split: str = "test"
    n: int | None = 300
    shots: int = 2
    selector: str = "image"
    k_tt: int = 64
    k_it: int = 16
    gate: str = "budget"
    budget: float = 0.05
    delta: float = 0.5
    warmup: int = 5
    max_calls: int | None = None
    max_cost_usd: float | None = None
    samples: int = 1
    agreement: float = 0.0
    answer: str = "student"
    uncertainty: str = "entropy"
    demo_order: str = "best-last"
    max_teacher_failures: int = 10
    pool_max: int | None = None
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 1:
            raise ICDError(f"--n must be >= 1, got {self.n}")
        if self.selector not in SELECTORS:
            raise ICDError(f"unknown selector {self.selector!r}; choose one of {', '.join(SELECTORS)}")
        if self.gate not in GATES:
            raise ICDError(f"unknown gate {self.gate!r}; choose one of {', '.join(GATES)}")
        if self.warmup < 0:
            raise ICDError(f"--warmup must be >= 0, got {self.warmup}")
        if self.pool_max is not None and self.pool_max < 1:
            raise ICDError(f"--pool-max must be >= 1, got {self.pool_max}")
        if self.max_calls is not None and self.max_calls < 0:
            raise ICDError(f"--max-calls must be >= 0, got {self.max_calls}")
        make_selector(self.selector, seed=self.seed, k_tt=self.k_tt, k_it=self.k_it)  # validates K_tt, K_it
        if self.uncertainty not in UNCERTAINTY:
            raise ICDError(
                f"unknown uncertainty {self.uncertainty!r}; choose one of {', '.join(UNCERTAINTY)}"
            )
        if not 0 < self.budget <= 1:
            raise ICDError(f"--budget is a teacher-call rate in (0, 1], got {self.budget}")
        if self.samples < 1:
            raise ICDError(f"--samples must be >= 1, got {self.samples}")
        if not 0 <= self.agreement <= 1:
            raise ICDError(f"--agreement must be in [0, 1], got {self.agreement}")
        self.loop_config()

    def loop_config(self) -> LoopConfig:
        return LoopConfig(
            shots=self.shots,
            answer=self.answer,  # type: ignore[arg-type]
            uncertainty=self.uncertainty,
            demo_order=self.demo_order,  # type: ignore[arg-type]
            max_teacher_failures=self.max_teacher_failures,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Parts:
    """The resolved backends of a run (shared across runs of an experiment to load models once)."""

    student: Any
    teacher: Any
    embedder: Any


def build_parts(cfg: RunConfig, ctx: ModelContext | None = None) -> Parts:
    ctx = ctx or ModelContext(seed=cfg.seed)
    return Parts(
        student=resolve_student(cfg.student, ctx),
        teacher=resolve_teacher(cfg.teacher, ctx),
        embedder=resolve_embedder(cfg.embedder, ctx),
    )


def query_stream(dataset: Dataset, order: list[int], start: int = 0) -> Iterator[Query | DataError]:
    """Queries in stream order from ``start``; an unreadable item becomes a DataError carrying its position."""
    for pos in range(start, len(order)):
        try:
            q = dataset.item(order[pos])
        except DataError as e:
            e.position = pos  # type: ignore[attr-defined]
            yield e
            continue
        yield replace(q, position=pos)


def stored_config(out: str | Path) -> RunConfig:
    """The config of the run in ``out`` (for --resume)."""
    cfg_path = Path(out) / "config.json"
    if not cfg_path.exists():
        raise ICDError(f"nothing to resume in {out}: no config.json")
    try:
        return RunConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ICDError(f"cannot read {cfg_path}: {e}") from e


def _refuse_existing_run(out: Path) -> None:
    if (out / "log.jsonl").exists() or (out / "pool.sqlite").exists():
        raise ICDError(f"{out} already holds a run; pass --resume to continue it or choose another --out")


def preflight(cfg: RunConfig, out: str | Path, resume: bool) -> tuple[RunConfig, Dataset]:
    """Cheap checks before any model loads: the output folder and the dataset."""
    out = Path(out)
    if resume:
        cfg = stored_config(out)
    else:
        _refuse_existing_run(out)
    dataset = load_dataset(cfg.dataset, split=cfg.split)
    stream_order(len(dataset), cfg.n, cfg.seed, cfg.shuffle)  # raises on an empty stream
    return cfg, dataset


def check_output_dir(out: Path, cfg: RunConfig, resume: bool) -> RunConfig:
    """Refuse to mix runs: a fresh run needs an empty folder; --resume continues the stored config."""
    if resume:
        return stored_config(out)
    cfg_path = out / "config.json"
    _refuse_existing_run(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg_path, asdict(cfg))
    return cfg


def run_icd(
    cfg: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    parts: Parts | None = None,
    dataset: Dataset | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) ICD over the configured stream; returns the summary written to summary.json."""
    out = Path(out)
    cfg = check_output_dir(out, cfg, resume)
    dataset = dataset or load_dataset(cfg.dataset, split=cfg.split)
    order = stream_order(len(dataset), cfg.n, cfg.seed, cfg.shuffle)
    parts = parts or build_parts(cfg)
    if cfg.max_cost_usd is not None and getattr(parts.teacher, "price_known", True) is False:
        raise ICDError(
            f"--max-cost cannot hold: the price of teacher {cfg.teacher} is unknown; add price_in= and "
            f"price_out= (USD per 1M tokens) to its spec"
        )
    t0 = time.perf_counter()
    with SQLitePool(out / "pool.sqlite", max_size=cfg.pool_max) as pool, RunLog(out / "log.jsonl") as log:
        distiller = Distiller(
            student=parts.student,
            annotator=TestTimeScaling(parts.teacher, n=cfg.samples, agreement_floor=cfg.agreement),
            embedder=parts.embedder,
            selector=make_selector(cfg.selector, seed=cfg.seed, k_tt=cfg.k_tt, k_it=cfg.k_it),
            gate=make_gate(
                cfg.gate,
                budget=cfg.budget,
                delta=cfg.delta,
                warmup=cfg.warmup,
                max_calls=cfg.max_calls,
                max_cost_usd=cfg.max_cost_usd,
                seed=cfg.seed,
            ),
            pool=pool,
            config=cfg.loop_config(),
            log=log,
        )
        start = distiller.next_position()
        if on_start is not None:
            on_start(start, len(order))
        distiller.run(query_stream(dataset, order, start), on_record=on_record)
        summary = summarize(distiller.records)
        summary["pool"] = pool.stats()
    summary["dataset"] = {"name": dataset.name, "size": len(dataset), "stream_length": len(order)}
    summary["wall_seconds_this_session"] = time.perf_counter() - t0
    summary["resumed_at"] = start if resume else None
    summary["config"] = asdict(cfg)
    write_json_atomic(out / "summary.json", summary)
    return summary
