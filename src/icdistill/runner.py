"""One ICD run from a validated config: build the parts, stream the dataset, write log, pool and summary."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from icdistill.data.dataset import Dataset, plural
from icdistill.data.stream import absolute_source, load_dataset, stream_order
from icdistill.distiller import Distiller, LoopConfig
from icdistill.errors import DataError, ICDError
from icdistill.flow import check_flow, run_stream
from icdistill.gate import GATE_SCORES, GATES, UNCERTAINTY, make_gate, with_caps
from icdistill.models.registry import (
    ModelContext,
    check_reachable,
    resolve_embedder,
    resolve_student,
    resolve_teacher,
)
from icdistill.pool import (
    LISTEN_URL_ENV,
    ClaimingAnnotator,
    PostgresPool,
    SQLitePool,
    is_postgres_url,
    shared_index_from_env,
)
from icdistill.protocols import Gate
from icdistill.run_dtype import keep_student_dtype, student_dtype
from icdistill.run_metrics import never_pooled, summarize
from icdistill.run_summary import plot_run, summary_details
from icdistill.runlog import FolderLock, RunLog, write_json_atomic
from icdistill.select import SELECTORS, make_selector
from icdistill.shard import check_shard, run_order
from icdistill.teacher import TestTimeScaling
from icdistill.types import Query


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
    warmup: int = 3
    gate_score: str = "coverage"
    max_calls: int | None = None
    max_cost_usd: float | None = None
    samples: int = 1
    agreement: float = 0.0
    answer: str = "student"
    uncertainty: str = "entropy"
    demo_order: str = "best-last"
    max_teacher_failures: int = 10
    # weigh the student's ICL and zero-shot readings and the pool's vote (icdistill.judge): on, full
    # (every reading of every query), off (plain ICL)
    judge: str = "on"
    pool_max: int | None = None
    # a PostgreSQL URL shares the pool with other workers (``icdistill.pool.pg``); None: pool.sqlite
    pool: str | None = None
    seed: int = 0
    shuffle: bool = True
    mix_questions: bool = False
    # teacher calls in flight while the stream goes on (1: the stream waits for each call), and the
    # student's micro-batch (``icdistill.flow``: read ahead together, answered one at a time, the
    # answers of 1); speed knobs, so a resumed run may change them. 8: 1.76x faster than 1 on the
    # default run on 2 CPU cores, the same answers (BENCHMARKS.md section 3)
    teacher_concurrency: int = 1
    batch: int = 8
    # "K/N": this run answers shard K of the stream's N (``icdistill.shard``; needs a shared pool)
    shard: str | None = None

    # flags a resumed run may change: ``n`` (extend the stream) and ``dataset`` (the same data moved)
    RESUMABLE = frozenset({"n", "dataset", "teacher_concurrency", "batch"})

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 1:
            raise ICDError(f"--n must be >= 1, got {self.n}")
        if self.selector not in SELECTORS:
            raise ICDError(f"unknown selector {self.selector!r}; choose one of {', '.join(SELECTORS)}")
        if self.gate not in GATES:
            raise ICDError(f"unknown gate {self.gate!r}; choose one of {', '.join(GATES)}")
        if self.warmup < 0:
            raise ICDError(f"--warmup must be >= 0, got {self.warmup}")
        if self.gate_score not in GATE_SCORES:
            raise ICDError(f"unknown --gate-score {self.gate_score!r}; choose one of {', '.join(GATE_SCORES)}")
        if self.pool_max is not None and self.pool_max < 1:
            raise ICDError(f"--pool-max must be >= 1, got {self.pool_max}")
        if self.pool is not None:
            check_pool_url(self.pool)
        check_flow(self.teacher_concurrency, self.batch, shared_pool=self.pool is not None)
        check_shard(self.shard, self.pool)
        if self.max_calls is not None and self.max_calls < 0:
            raise ICDError(f"--max-calls must be >= 0, got {self.max_calls}")
        if self.gate in ("budget", "random") and self.pool_max is not None and self.pool_max < self.warmup:
            raise ICDError(
                f"--pool-max {self.pool_max} is below --warmup {self.warmup}: the pool could never fill the "
                "warm-up, and every query would go to the teacher"
            )
        if self.gate == "threshold" and self.uncertainty in ("entropy", "margin") and not 0 <= self.delta < 1:
            raise ICDError(
                f"--delta {self.delta} is outside [0, 1), the range of --uncertainty {self.uncertainty}: "
                "the gate would ask always or never"
            )
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
            judge=self.judge,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in fields(cls)}
        if "split" in d and d["split"] is None:  # a dataset without splits (config.json says so)
            d = {k: v for k, v in d.items() if k != "split"}
        return cls(**{k: v for k, v in d.items() if k in names})

    def with_absolute_paths(self) -> RunConfig:
        """The dataset as an absolute path (a resume from another directory finds it); names such as
        ``fashion-mnist`` stay as they are."""
        return replace(self, dataset=absolute_source(self.dataset))


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


def check_parts_reachable(parts: Parts) -> None:
    """The remote models of a run answer (one cheap request each), before any query is streamed: a
    teacher that is down fails here in a second instead of after every query's retries."""
    check_reachable(parts.teacher)
    if parts.student is not parts.teacher:
        check_reachable(parts.student)


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


def _read_config_file(out: Path) -> dict[str, Any]:
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        raise ICDError(f"nothing to resume in {out}: no config.json")
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ICDError(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(data, dict):
        raise ICDError(f"cannot read {cfg_path}: not a JSON object")
    return data


def stored_config(out: str | Path) -> RunConfig:
    """The config of the run in ``out`` (for --resume). A run stored before a setting existed keeps
    the behaviour it started with: its gate ranked by uncertainty."""
    try:
        return RunConfig.from_dict({"gate_score": "uncertainty", **_read_config_file(Path(out))})
    except TypeError as e:
        raise ICDError(f"cannot read {Path(out) / 'config.json'}: {e}") from e


def lock_run(out: str | Path) -> FolderLock:
    """The exclusive lock of a run folder (``run.lock`` inside it); a second process gets an ICDError."""
    return FolderLock(Path(out) / "run.lock", f"run folder {out}")


def check_out_path(out: Path) -> None:
    """A usable output folder, checked before any model loads: not a file, not under a file, writable."""
    if out.exists() and not out.is_dir():
        raise ICDError(f"--out {out} is a file, not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ICDError(f"--out {out}: {parent} is a file, so no folder can be made under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ICDError(f"--out {out}: no permission to write in {parent}")


def _refuse_existing_run(out: Path) -> None:
    if (out / "log.jsonl").exists() or (out / "pool.sqlite").exists():
        raise ICDError(
            f"{out} already holds a run; pass --resume to continue it, --replace to start it afresh, "
            "or choose another --out"
        )


# what a run writes in its folder (README, "icd run"); --replace deletes these and nothing else
RUN_FILES = (
    "log.jsonl",
    "summary.json",
    "config.json",
    "run.png",
    "pool.sqlite",
    "pool.sqlite-wal",
    "pool.sqlite-shm",
    "pool.sqlite-journal",
    "pool.sqlite.lock",
    "pool.sqlite.index",
    "pool-index",
)


def clear_run(out: Path) -> None:
    """Delete the run in ``out`` (its ``RUN_FILES``; other files stay) so a new one can start there.
    A shared pool's annotations stay in its database."""
    import shutil

    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def resume_config(out: Path, changes: dict[str, Any] | None = None) -> RunConfig:
    """The stored config of the run in ``out`` with the allowed ``changes`` (``RunConfig.RESUMABLE``:
    a longer ``n``, the dataset at another path). Any other changed flag is refused: a resumed run
    keeps its config, a new one needs a new ``--out``."""
    stored = stored_config(out)
    changes = dict(changes or {})
    refused = [
        f"--{k.replace('_', '-')} {v} (the run has {getattr(stored, k)})"
        for k, v in changes.items()
        if k not in RunConfig.RESUMABLE and v != getattr(stored, k)
    ]
    if refused:
        raise ICDError(
            f"--resume continues the run in {out} with its stored config; these flags differ: {'; '.join(refused)}. "
            "Only --n (to extend the stream), --dataset (the same data at another path) and the speed "
            "flags --teacher-concurrency and --batch may change. Choose another --out for a new run, or "
            "run the same command with --replace instead of --resume to delete this run and start afresh"
        )
    cfg = stored
    if "n" in changes and changes["n"] != stored.n:
        done = _positions_done(out)
        new_n = changes["n"]
        if new_n is not None and new_n < done:
            raise ICDError(
                f"--n {new_n} is shorter than the {done} queries the run in {out} already processed"
            )
        cfg = replace(cfg, n=new_n)
    if changes.get("dataset") is not None:
        cfg = replace(cfg, dataset=changes["dataset"])
    for speed in ("teacher_concurrency", "batch"):  # how fast, not what: a resumed run may change them
        if changes.get(speed) is not None:
            cfg = replace(cfg, **{speed: changes[speed]})
    return cfg.with_absolute_paths()


def _positions_done(out: Path) -> int:
    from icdistill.runlog import read_records

    log = out / "log.jsonl"
    recs = read_records(log) if log.exists() else []
    return max((r.get("position", -1) for r in recs), default=-1) + 1


def check_dataset(out: Path, dataset: Dataset) -> None:
    """Refuse to resume on data that changed: stream positions would point at other items."""
    stored = _read_config_file(out)
    fp = stored.get("dataset_fingerprint")
    if fp is None:
        return  # a run from before fingerprints: nothing to compare
    if list(stored.get("dataset_options") or []) != list(dataset.options or []):
        raise ICDError(
            f"the dataset's options changed since the run in {out} started: {stored.get('dataset_options')} "
            f"then, {list(dataset.options or [])} now; resume with the same data or start a new --out"
        )
    if fp != dataset.fingerprint():
        raise ICDError(
            f"the dataset changed since the run in {out} started ({stored.get('dataset_size')} items then, "
            f"{len(dataset)} now, or their files/labels differ); resuming would process other items at "
            "the same positions: restore the data or start a new --out"
        )


def _write_config(out: Path, cfg: RunConfig, dataset: Dataset) -> None:
    write_json_atomic(
        out / "config.json",
        {
            **asdict(cfg),
            # the split actually read: a Hugging Face set's own when it has one, none for a folder
            "split": getattr(dataset, "split", None),
            "dataset_fingerprint": dataset.fingerprint(),
            "dataset_size": len(dataset),
            "dataset_options": list(dataset.options) if dataset.options else None,
        },
    )


def run_warnings(cfg: RunConfig, dataset: Dataset) -> list[str]:
    """Settings that are accepted but probably not what was meant."""
    out = list(dataset.warnings)
    labels = dataset.labels()
    unlabelled = [i for i, label in enumerate(labels) if not label]
    if unlabelled:
        extra = (
            " and the reference teacher cannot annotate them" if cfg.teacher.startswith("reference") else ""
        )
        out.append(
            f"{len(unlabelled)} of {plural(len(labels), 'item')} have no label (first: "
            f"{dataset.where(unlabelled[0])}): they are left out of accuracy{extra}"
        )
    if cfg.n is not None and cfg.n > len(dataset):
        out.append(
            f"--n {cfg.n} but the dataset has {plural(len(dataset), 'item')}: the stream has {len(dataset)}"
        )
    if cfg.shots == 0 and cfg.gate not in ("never",):
        out.append(
            "--shots 0: the student never sees demonstrations, so teacher calls (warm-up included) cannot "
            "help it; use --gate never for zero-shot"
        )
    if cfg.uncertainty == "token-entropy" and dataset.options is not None:
        out.append(
            "--uncertainty token-entropy on a classification dataset is the option entropy (--uncertainty "
            "entropy): options are scored, not generated"
        )
    if dataset.options is not None and len(dataset.options) < 2:
        out.append(f"the dataset has one option ({dataset.options[0]}): every answer is that option")
    return out


def preflight(
    cfg: RunConfig,
    out: str | Path,
    resume: bool,
    changes: dict[str, Any] | None = None,
    replace: bool = False,
) -> tuple[RunConfig, Dataset]:
    """Cheap checks before any model loads: the output folder and the dataset. On resume the stored
    config is read (with the allowed ``changes``) and the dataset must be the one the run started on.
    With ``replace`` a run already in ``out`` is allowed (the caller deletes it with ``clear_run``
    once the models are up)."""
    out = Path(out)
    check_out_path(out)
    if resume:
        cfg = resume_config(out, changes)
    else:
        if not replace:
            _refuse_existing_run(out)
        cfg = cfg.with_absolute_paths()
    dataset = load_dataset(cfg.dataset, split=cfg.split)
    stream_order(len(dataset), cfg.n, cfg.seed, cfg.shuffle)  # raises on an empty stream
    if resume:
        check_dataset(out, dataset)
    return cfg, dataset


def check_output_dir(
    out: Path,
    cfg: RunConfig,
    resume: bool,
    dataset: Dataset | None = None,
    changes: dict[str, Any] | None = None,
) -> RunConfig:
    """Refuse to mix runs: a fresh run needs an empty folder; --resume continues the stored config
    with the allowed ``changes`` (see ``resume_config``). Without ``changes`` a resume takes the
    resumable fields of ``cfg`` that are not at their defaults (a longer ``n``, a moved dataset)."""
    check_out_path(out)
    if resume:
        if changes is None:
            stored, default = stored_config(out), RunConfig()
            changes = {
                k: getattr(cfg, k)
                for k in RunConfig.RESUMABLE
                if getattr(cfg, k) != getattr(stored, k) and getattr(cfg, k) != getattr(default, k)
            }
        cfg = resume_config(out, changes)
        dataset = dataset or load_dataset(cfg.dataset, split=cfg.split)
        check_dataset(out, dataset)
        _write_config(out, cfg, dataset)
        return cfg
    cfg = cfg.with_absolute_paths()
    _refuse_existing_run(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out, cfg, dataset or load_dataset(cfg.dataset, split=cfg.split))
    return cfg


def check_pool_url(url: str) -> None:
    if not is_postgres_url(url):
        raise ICDError(
            f"--pool takes a postgresql:// URL (the default pool is the run's pool.sqlite), got {url!r}"
        )
    if re.search(r"://[^/@]*:[^/@]*@", url):
        # the URL is stored in the run's config.json: keep the password out of it
        raise ICDError("--pool: put the password in PGPASSWORD or ~/.pgpass, not in the URL")


def open_pool(cfg: RunConfig, out: Path) -> SQLitePool | PostgresPool:
    """The run's pool: its own SQLite file, or a PostgreSQL pool shared with other workers (the workers
    of a host map one saved index, ``$ICD_POOL_CACHE``; with it off each keeps its own beside its run
    folder; the global caps are ``--max-calls`` and ``--max-cost``). The
    caller holds the run folder's lock (``lock_run``)."""
    if cfg.pool is None:
        return SQLitePool(out / "pool.sqlite", max_size=cfg.pool_max, lock=True)
    # the owner of its query ids: this run folder (a resumed process recovers what the killed one
    # stored; another run's annotation of the same dataset item is a label bought, not ours)
    owner = f"run:{socket.gethostname()}:{out.resolve()}"
    return PostgresPool(
        cfg.pool,
        max_size=cfg.pool_max,
        max_calls=cfg.max_calls,
        max_cost_usd=cfg.max_cost_usd,
        index_dir=out / "pool-index",
        owner=owner,
        # workers on one host map one saved index ($ICD_POOL_CACHE, "off": each its own copy)
        shared_index=shared_index_from_env(),
        listen_url=os.environ.get(LISTEN_URL_ENV) or None,
        # the caller holds the run folder's lock: an earlier process of this folder is dead, and its
        # claims (a teacher call it was making when killed) are this one's at once
        take_over=True,
    )


def run_icd(
    cfg: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    parts: Parts | None = None,
    dataset: Dataset | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    changes: dict[str, Any] | None = None,
    lock: FolderLock | None = None,
    gate: Gate | None = None,
) -> dict[str, Any]:
    """Run (or resume) ICD over the configured stream; returns the summary written to summary.json
    (the run's plot goes to run.png). ``gate``: this gate (under the config's caps) instead of the
    configured one, e.g. an evaluation's baseline. One process per run folder: without a held ``lock`` (from
    ``lock_run``) the folder is locked here, and a second process gets an ICDError."""
    out = Path(out)
    check_out_path(out)
    own_lock = lock_run(out).acquire() if lock is None else None
    try:
        return _run_locked(cfg, out, resume, parts, dataset, on_start, on_record, changes, gate)
    finally:
        if own_lock is not None:
            own_lock.release()


def _run_locked(
    cfg: RunConfig,
    out: Path,
    resume: bool,
    parts: Parts | None,
    dataset: Dataset | None,
    on_start: Callable[[int, int], None] | None,
    on_record: Callable[[dict[str, Any]], None] | None,
    changes: dict[str, Any] | None,
    gate: Gate | None = None,
) -> dict[str, Any]:
    cfg = check_output_dir(out, cfg, resume, dataset, changes)
    dataset = dataset or load_dataset(cfg.dataset, split=cfg.split)
    order = run_order(dataset, cfg.n, cfg.seed, cfg.shuffle, cfg.shard)
    if parts is None:
        parts = build_parts(cfg)
        check_parts_reachable(parts)
    keep_student_dtype(out, parts.student)
    if cfg.max_cost_usd is not None and getattr(parts.teacher, "price_known", True) is False:
        raise ICDError(
            f"--max-cost cannot hold: the price of teacher {cfg.teacher} is unknown; add price_in= and "
            f"price_out= (USD per 1M tokens) to its spec"
        )
    t0 = time.perf_counter()
    with (
        open_pool(cfg, out) as pool,
        RunLog(out / "log.jsonl") as log,
    ):
        annotator: Any = TestTimeScaling(parts.teacher, n=cfg.samples, agreement_floor=cfg.agreement)
        if isinstance(pool, PostgresPool):  # buy each image+prompt once across the pool's workers
            annotator = ClaimingAnnotator(annotator, pool)
        distiller = Distiller(
            student=parts.student,
            annotator=annotator,
            embedder=parts.embedder,
            selector=make_selector(
                cfg.selector, seed=cfg.seed, k_tt=cfg.k_tt, k_it=cfg.k_it, mix_questions=cfg.mix_questions
            ),
            gate=make_gate(
                cfg.gate,
                budget=cfg.budget,
                delta=cfg.delta,
                warmup=cfg.warmup,
                score=cfg.gate_score,
                max_calls=cfg.max_calls,
                max_cost_usd=cfg.max_cost_usd,
                seed=cfg.seed,
            )
            if gate is None
            else with_caps(gate, cfg.max_calls, cfg.max_cost_usd),
            pool=pool,
            config=cfg.loop_config(),
            log=log,
        )
        start = distiller.next_position()
        if on_start is not None:
            on_start(start, len(order))
        run_stream(
            distiller,
            query_stream(dataset, order, start),
            on_record=on_record,
            teacher_concurrency=cfg.teacher_concurrency,
            batch=cfg.batch,
        )
        summary = summarize(distiller.records)
        summary["pool"] = pool.stats()
        # what the pool holds now (a resumed or shared pool holds more than this run's annotations)
        summary["never_pooled_labels"] = never_pooled(distiller.records, set(pool.answers()))
        # where the pool lives: the run's file, or the shared database (its URL holds no password)
        summary["pool_location"] = cfg.pool if cfg.pool is not None else str(out / "pool.sqlite")
    summary["dataset"] = {"name": dataset.name, "size": len(dataset), "stream_length": len(order)}
    if cfg.shard is not None:  # the stream_length above is this shard's; `icd merge` adds the shards up
        summary["shard"] = cfg.shard
    summary["unlabelled_queries"] = sum(
        r.get("label") is None for r in distiller.records if r.get("event") == "query"
    )
    summary.update(summary_details(distiller.records))
    summary["wall_seconds_this_session"] = time.perf_counter() - t0
    summary["resumed_at"] = start if resume else None
    summary["config"] = asdict(cfg)
    # the precision the student ran in: bf16 where the hardware multiplies it (models/precision.py), so
    # the same command can read a near-tie differently on another machine
    summary["student_dtype"] = student_dtype(parts.student)
    write_json_atomic(out / "summary.json", summary)
    plot_run(distiller.records, out / "run.png")
    return summary
