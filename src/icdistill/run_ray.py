"""``icd run --ray``: one stream answered by N shard actors on Ray, one shared pool, one summary.

The driver splits the stream in N shards (``icdistill.shard``) and starts N actors; each loads the
models once and runs its shard with ``run_icd`` into ``out/shard-K-of-N/``, an ordinary run folder on
the one PostgreSQL pool (its claims buy each label once, its ledger holds ``--max-calls`` and
``--max-cost`` across every actor). The driver reads the shards' logs for one progress bar over the
whole stream and, at the end, merges them (``icdistill.merge``) into ``out/summary.json``,
``per_label.csv`` and ``run.png``.

An actor that dies (killed, node lost) is restarted by Ray and its shard task retried, which resumes
the shard from its folder: a position is logged once, and a label it had bought is found in the pool,
not bought again. Past its restarts the actor is replaced by a new one (as is an actor whose shard
logged nothing for ``stall_timeout_s``), up to ``max_restarts`` times per shard; a shard that still
fails, or raises, is named at the end (the merge says it is unfinished) while the others finish, and
``--resume`` continues it. Actors write the shard folders, so on a cluster ``--out`` must be on storage
every node sees at the same path: each actor reads back the driver's marker before it starts
(``icdistill.eval.ray_runner``, which this module reuses for connecting, the marker and errors).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from icdistill.errors import ICDError, RaySetupError
from icdistill.eval.ray_runner import (
    _PASS_ENV,
    MARKER,
    RayCells,
    RayOptions,
    _ActorLost,
    _get,
    _storage_message,
    storage_problem,
    wait_for_cell,
    write_marker,
)
from icdistill.merge import MergeResult, merge_shards
from icdistill.pool import is_postgres_url
from icdistill.runlog import write_json_atomic
from icdistill.runner import Parts, RunConfig, run_icd
from icdistill.shard import Shard

RUN_FILE = "ray-run.json"  # the whole run's config and its number of shards (for --resume)


@dataclass(frozen=True)
class RayRunOptions:
    """How wide: ``workers`` shard actors of ``actor_cpus`` CPUs (torch threads) and ``actor_gpus``
    GPUs each; ``address`` None starts a local Ray instance of ``cpus`` CPUs (default: all)."""

    workers: int
    address: str | None = None
    cpus: int | None = None
    actor_cpus: float = 1.0
    actor_gpus: float = 0.0
    max_restarts: int = 3
    stall_timeout_s: float | None = None  # a shard that logs nothing this long: its actor is replaced
    poll_s: float = 0.5  # how often the driver reads the shards' logs (progress, stalls)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise RaySetupError(f"--workers must be at least 1, got {self.workers}")
        if not self.actor_cpus > 0:
            raise RaySetupError(f"--ray-actor-cpus must be > 0, got {self.actor_cpus}")
        if self.actor_gpus < 0:
            raise RaySetupError(f"--ray-actor-gpus must be >= 0, got {self.actor_gpus}")
        if self.stall_timeout_s is not None and not self.stall_timeout_s > 0:
            raise RaySetupError(f"--ray-stall-timeout must be > 0 seconds, got {self.stall_timeout_s}")
        RayOptions(address=self.address, cpus=self.cpus)  # the same checks as icd eval --ray


@dataclass
class ShardJob:
    """What every actor gets once (through Ray's object store): the whole run's config, where the
    shard folders go, the changes a resume allows, and injected models (None: built from specs)."""

    cfg: RunConfig
    out: Path
    count: int
    changes: dict[str, Any] = field(default_factory=dict)
    parts: Parts | None = None


class _ShardActor:
    """One Ray actor: models loaded once, running (or resuming) the shard it is sent."""

    def __init__(self, out: Path, token: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.out, self.token = out, token
        self.parts: Parts | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "storage_problem": storage_problem(self.out / MARKER, self.token),
        }

    def run_shard(self, job_ref: list[Any], index: int) -> dict[str, Any]:
        import ray

        from icdistill.runner import build_parts, check_parts_reachable

        problem = storage_problem(self.out / MARKER, self.token)
        if problem is not None:
            raise RaySetupError(_storage_message(self.out, socket.gethostname(), problem))
        job: ShardJob = ray.get(job_ref[0])
        if self.parts is None:
            self.parts = job.parts or build_parts(job.cfg)
            if job.parts is None:
                check_parts_reachable(self.parts)
        shard = Shard(index, job.count)
        folder = job.out / shard.folder_name
        wait_for_cell(folder)  # a process of a killed driver may still be leaving it
        resume = (folder / "config.json").exists()
        summary = run_icd(
            replace(job.cfg, shard=str(shard)),
            folder,
            resume=resume,
            parts=self.parts,
            changes=dict(job.changes) if resume else None,
        )
        return {k: summary.get(k) for k in ("n_queries", "teacher_calls", "accuracy")}


class LogTail:
    """The new complete records of a run log since the last read (a torn last line waits)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in data[:end].split(b"\n")[:-1]:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out


def _stream_events(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("event") in ("query", "bad_input")]


def check_ray_config(cfg: RunConfig) -> None:
    if cfg.shard is not None:
        raise ICDError("--ray splits the stream itself (--workers shards): leave out --shard")
    if cfg.pool is None or not is_postgres_url(cfg.pool):
        raise ICDError(
            "--ray needs a shared pool: add --pool postgresql://... (every shard actor buys labels into, "
            "and draws demos from, the one pool; a pool.sqlite is one process's own)"
        )


def prepare_out(cfg: RunConfig, out: Path, workers: int, resume: bool, changes: dict[str, Any]) -> RunConfig:
    """The whole run's config: stored in ``out/ray-run.json`` when fresh (``out`` must hold no run),
    read back (with the resumable ``changes``) on ``--resume``, whose split must stay the same."""
    run_file = out / RUN_FILE
    if not resume:
        check_ray_config(cfg)
        if run_file.exists() or any(out.glob("shard-*")):
            raise ICDError(
                f"{out} already holds a run; pass --resume to continue it, or choose another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        cfg = cfg.with_absolute_paths()
        write_json_atomic(run_file, {"config": asdict(cfg), "workers": workers})
        return cfg
    if not run_file.exists():
        raise ICDError(f"nothing to resume in {out}: no {RUN_FILE} (not an icd run --ray folder)")
    stored = json.loads(run_file.read_text(encoding="utf-8"))
    if stored["workers"] != workers:
        raise ICDError(
            f"the run in {out} is split in {stored['workers']} shards: resume it with --workers "
            f"{stored['workers']} (another split would answer items twice)"
        )
    base = RunConfig.from_dict(stored["config"])
    refused = [k for k, v in changes.items() if k not in RunConfig.RESUMABLE and v != getattr(base, k)]
    if refused:
        raise ICDError(
            f"--resume continues the run in {out} with its stored config; these flags differ: "
            f"{', '.join('--' + k.replace('_', '-') for k in refused)} (only --n and --dataset may change)"
        )
    new_n = changes.get("n", base.n)
    if base.n is None and new_n is not None or (new_n is not None and base.n is not None and new_n < base.n):
        raise ICDError(f"--n {new_n} is shorter than the run's stream ({base.n or 'all'}): --n may only grow")
    base = replace(
        base, **{k: v for k, v in changes.items() if k in RunConfig.RESUMABLE}
    ).with_absolute_paths()
    write_json_atomic(run_file, {"config": asdict(base), "workers": workers})
    return base


def run_on_ray(
    cfg: RunConfig,
    out: str | Path,
    options: RayRunOptions,
    *,
    resume: bool = False,
    changes: dict[str, Any] | None = None,
    parts: Parts | None = None,
    total: int | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> MergeResult:
    """Run (or ``resume``) the stream of ``cfg`` in ``options.workers`` shards on Ray actors and merge
    them into ``out``; ``total``: the whole stream's length, for ``on_start(done, total)``."""
    from icdistill.runner import lock_run

    out = Path(out).resolve()  # actors may not share the driver's working directory
    changes = dict(changes or {})
    base = prepare_out(cfg, out, options.workers, resume, changes)
    t0 = time.perf_counter()
    with lock_run(out):
        runner = _ShardRunner(options, ShardJob(base, out, options.workers, changes, parts))
        runner.run(total, on_start, on_record)
        folders = [out / Shard(k, options.workers).folder_name for k in range(1, options.workers + 1)]
        result = merge_shards([f for f in folders if f.is_dir()], out)
        result.failed = runner.failed
        result.summary["shards"]["failed"] = runner.failed
        result.summary["ray_workers"] = runner.workers
        result.summary["wall_seconds_this_session"] = time.perf_counter() - t0
        write_json_atomic(out / "summary.json", result.summary)
    return result


class _ShardRunner:
    """The driver's side: actors, dispatch, progress, replacement."""

    def __init__(self, options: RayRunOptions, job: ShardJob) -> None:
        self.options, self.job = options, job
        self.failed: dict[str, str] = {}  # shard -> why it did not finish
        self.workers: list[dict[str, Any]] = []  # what each actor reported (node, pid)
        self.replaced = 0

    def run(
        self,
        total: int | None,
        on_start: Callable[[int, int], None] | None,
        on_record: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        opts, job = self.options, self.job
        cells = RayCells(RayOptions(address=opts.address, cpus=opts.cpus))
        cells.connect()
        ray = cells._ray
        token = uuid.uuid4().hex
        write_marker(job.out, token)
        actors: dict[int, Any] = {}
        try:
            self._check_resources(ray)
            job_ref = ray.put(job)
            threads = max(1, int(opts.actor_cpus))
            env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
            actor_cls = ray.remote(_ShardActor).options(
                num_cpus=opts.actor_cpus,
                num_gpus=opts.actor_gpus,
                max_restarts=opts.max_restarts,
                max_task_retries=opts.max_restarts,
                runtime_env={"env_vars": env},
            )

            def start(shards: list[int]) -> dict[Any, int]:
                """New actors for ``shards`` (started together, then each checked: it sees --out),
                each sent its shard; returns result reference -> shard."""
                started = {k: actor_cls.remote(job.out, token, threads) for k in shards}
                actors.update(started)
                described = [_get(ray, a.describe.remote(), "starting") for a in started.values()]
                for k, d in zip(started, described, strict=True):
                    if d["storage_problem"]:
                        raise RaySetupError(_storage_message(job.out, d["node"], d["storage_problem"]))
                    self.workers.append({"shard": str(Shard(k, job.count)), **d})
                return {a.run_shard.remote([job_ref], k): k for k, a in started.items()}

            self._dispatch(ray, start, actors, total, on_start, on_record)
        finally:
            for actor in actors.values():
                with contextlib.suppress(Exception):
                    ray.kill(actor)
            with contextlib.suppress(OSError):
                (job.out / MARKER).unlink()
            cells.close()

    def _check_resources(self, ray: Any) -> None:
        opts = self.options
        have = ray.cluster_resources()
        for name, each, flag in (
            ("CPU", opts.actor_cpus, "--ray-actor-cpus"),
            ("GPU", opts.actor_gpus, "--ray-actor-gpus"),
        ):
            need = each * opts.workers
            if need and have.get(name, 0) + 1e-9 < need:
                raise RaySetupError(
                    f"--workers {opts.workers} x {flag} {each:g} needs {need:g} {name}s; the Ray cluster has "
                    f"{have.get(name, 0):g} (fewer workers, or a smaller {flag})"
                )

    def _dispatch(
        self,
        ray: Any,
        start: Callable[[list[int]], dict[Any, int]],
        actors: dict[int, Any],
        total: int | None,
        on_start: Callable[[int, int], None] | None,
        on_record: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        opts, job = self.options, self.job
        tails = {
            k: LogTail(job.out / Shard(k, job.count).folder_name / "log.jsonl")
            for k in range(1, job.count + 1)
        }
        done = sum(len(_stream_events(t.read())) for t in tails.values())  # a resumed run's logged positions
        if on_start is not None:
            on_start(done, total if total is not None else done)
        running = start(list(range(1, job.count + 1)))
        last_growth = {k: time.monotonic() for k in running.values()}
        tries = dict.fromkeys(running.values(), 0)

        def retry(k: int, why: str) -> None:
            with contextlib.suppress(Exception):
                ray.kill(actors[k], no_restart=True)
            tries[k] += 1
            if tries[k] > opts.max_restarts:
                self.failed[str(Shard(k, job.count))] = why
                return
            self.replaced += 1
            running.update(start([k]))
            last_growth[k] = time.monotonic()

        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=opts.poll_s)
            now = time.monotonic()
            for k, tail in tails.items():
                new = _stream_events(tail.read())
                if new:
                    last_growth[k] = now
                for rec in new:
                    if on_record is not None:
                        on_record(rec)
            for ref in ready:
                k = running.pop(ref)
                try:
                    _get(ray, ref, f"running shard {Shard(k, job.count)}")
                except RaySetupError:
                    raise
                except _ActorLost as e:
                    retry(k, str(e))
                except Exception as e:  # this shard's own failure: the others go on
                    self.failed[str(Shard(k, job.count))] = (
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    )
            if opts.stall_timeout_s is not None:
                for ref, k in list(running.items()):
                    if now - last_growth[k] > opts.stall_timeout_s:
                        del running[ref]
                        retry(k, f"logged nothing for {opts.stall_timeout_s:g} s")


def cmd_run_ray(args: Any, cfg: RunConfig, changes: dict[str, Any] | None) -> int:
    """``icd run --ray``: the command line's side (checks, progress bar, summary table)."""
    from rich.console import Console

    from icdistill.data.stream import load_dataset, stream_order
    from icdistill.errors import UsageError
    from icdistill.report import print_summary, progress_callbacks
    from icdistill.runner import run_warnings

    address = None if args.ray == "local" else args.ray
    if address is not None and not args.out:
        raise UsageError(
            f"--ray {address} runs the shards on other nodes: give --out, a folder on storage every node "
            "sees at the same path (e.g. an NFS mount); each actor checks that it sees it"
        )
    if args.resume and not args.out:
        raise UsageError("--resume needs --out, the folder of the run to continue")
    if args.replace:
        raise UsageError("--replace is not for --ray runs: choose another --out (or delete the old one)")
    try:
        options = RayRunOptions(
            workers=args.workers,
            address=address,
            cpus=args.ray_cpus,
            actor_cpus=args.ray_actor_cpus,
            actor_gpus=args.ray_actor_gpus,
            stall_timeout_s=args.ray_stall_timeout,
        )
    except RaySetupError as e:
        raise UsageError(str(e)) from e
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    console = Console(stderr=True)
    if not args.resume:
        dataset = load_dataset(cfg.with_absolute_paths().dataset, split=cfg.split)
        for warning in run_warnings(cfg, dataset):
            console.print(f"icd: warning: {warning}", style="yellow", markup=False, highlight=False, soft_wrap=True)
        length = len(stream_order(len(dataset), cfg.n, cfg.seed, cfg.shuffle))
    else:
        length = None
    try:
        with progress_callbacks(console, disabled=args.quiet) as (on_start, on_record):
            if length is None:  # a resume: the stored stream, known once the run file is read
                stored = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).exists() else None
                if stored is not None:
                    base = RunConfig.from_dict({**stored["config"], **(changes or {})})
                    dataset = load_dataset(base.dataset, split=base.split)
                    length = len(stream_order(len(dataset), base.n, base.seed, base.shuffle))
            result = run_on_ray(
                cfg,
                out,
                options,
                resume=args.resume,
                changes=changes,
                total=length,
                on_start=on_start,
                on_record=on_record,
            )
    except KeyboardInterrupt:
        print(f"icd: interrupted; continue with: icd run --ray --resume --workers {args.workers} --out {out}")
        return 130
    print_summary(result.summary, out, Console())
    problems = result.problems() + [
        f"shard {s} failed: {why}" for s, why in result.failed.items() if s not in result.unfinished
    ]
    if problems:
        for p in problems:
            print(f"icd: error: {p}", file=sys.stderr)
        print(
            f"icd: the summary covers the finished part; continue with: icd run --ray --resume "
            f"--workers {args.workers} --out {out}",
            file=sys.stderr,
        )
        return 1
    return 0
