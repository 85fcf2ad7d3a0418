"""A stream in shards on one shared PostgreSQL pool (issue 26): ``icd run --ray`` with 1 vs 2 actors,
the shared pool's per-query overhead against a run's own SQLite pool, and the notification delay from
one worker's new demo to its use by another.

Usage: ``nice -n 19 .venv/bin/python benchmarks/bench_run_shards.py [--queries 100] [--repeats 2]
[--parts actors,overhead,notify] [--models fake,default]``.

Starts a throwaway PostgreSQL cluster (Debian's server, as the tests do); every run gets a fresh
database. The offline default models (``local:smollm2`` student, ``local:conse`` embedder,
``reference`` teacher), Fashion-MNIST, 10% budget, seed 0.

* ``actors``: ``run_on_ray`` (what ``icd run --ray --workers W`` runs) with W = 1 and 2 actors of one
  CPU each on a local 2-CPU Ray instance, alternating, ``--repeats`` times. Wall time from the call to
  the merged summary (Ray start, actors, model loading in each actor included), and the steady rate:
  queries per second between the 10th logged query and the last (the driver's view, read from the
  shards' logs every 0.5 s). Also the most PostgreSQL connections the run held (``pg_stat_activity``
  on its database, sampled every 0.2 s).
* ``overhead``: one process, the same stream with the run's own ``pool.sqlite`` and with the shared
  pool (``--pool postgresql://``, one worker), each with freshly loaded models, alternating, and the
  same with the tests' fake student and embedder (the pool's own cost, without the models'): per-query
  wall time after the 5th query (model loading left out).
* ``notify``: worker A (this process) adds a demo to the pool, worker B (a second process, its own
  ``PostgresPool``) calls ``refresh()`` in a loop (what each query's selection does first) and stamps
  when the demo is in its copy; ``--trials`` demos, one at a time. The delay a demo takes to be *used*
  by B is this plus the wait for B's next query (half a query's time on average).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from pg_cluster import fresh_database, throwaway_cluster  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("ICD_POOL_CACHE", tempfile.mkdtemp(prefix="icd-bench-cache-"))

_dbs = iter(range(10**6))


def _db(cluster: str) -> str:
    return fresh_database(cluster, f"shards_{os.getpid()}_{next(_dbs)}")


def _steady_rate(stamps: list[float], skip: int) -> float | None:
    if len(stamps) <= skip + 1:
        return None
    return (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])


class _Connections:
    """The most backends connected to ``dbname`` while the block runs (sampled every 0.2 s)."""

    def __init__(self, cluster: str, url: str) -> None:
        self.cluster, self.dbname, self.most = cluster, url.rsplit("/", 1)[1], 0
        self._stop = threading.Event()

    def __enter__(self) -> _Connections:
        import psycopg

        def sample() -> None:
            with psycopg.connect(self.cluster, autocommit=True) as admin:
                while not self._stop.wait(0.2):
                    (n,) = admin.execute(
                        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s", (self.dbname,)
                    ).fetchone()
                    self.most = max(self.most, int(n))

        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def bench_actors(
    cluster: str, queries: int, repeats: int, folder: Path, order: tuple[int, ...] = (1, 2)
) -> dict[str, Any]:
    import ray

    from icdistill.run_ray import RayRunOptions, run_on_ray
    from icdistill.runner import RunConfig

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    rows: list[dict[str, Any]] = []
    try:
        for rep in range(repeats):
            for workers in order:
                url = _db(cluster)
                cfg = RunConfig(n=queries, budget=0.1, pool=url)
                stamps: list[float] = []
                t0 = time.perf_counter()
                with _Connections(cluster, url) as conns:
                    result = run_on_ray(
                        cfg,
                        folder / f"actors-{workers}-{rep}",
                        RayRunOptions(workers=workers),
                        on_record=lambda r, stamps=stamps: stamps.append(time.perf_counter()),
                    )
                wall = time.perf_counter() - t0
                s = result.summary
                rows.append(
                    {
                        "workers": workers,
                        "wall_s": round(wall, 1),
                        "steady_qps": round(_steady_rate(stamps, 10) or 0, 3),
                        "n_queries": s["n_queries"],
                        "teacher_calls": s["teacher_calls"],
                        "accuracy": s["accuracy"],
                        "max_connections": conns.most,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
    out: dict[str, Any] = {"runs": rows}
    for w in order:
        mine = [r for r in rows if r["workers"] == w]
        out[f"wall_s_{w}"] = statistics.median(r["wall_s"] for r in mine)
        out[f"steady_qps_{w}"] = statistics.median(r["steady_qps"] for r in mine)
    out["wall_ratio_2_over_1"] = round(out["wall_s_2"] / out["wall_s_1"], 3)
    return out


def _one_run(cfg: Any, out: Path, parts: Any) -> tuple[float | None, dict[str, Any]]:
    from icdistill.runner import run_icd

    stamps: list[float] = []
    summary = run_icd(cfg, out, parts=parts, on_record=lambda r: stamps.append(time.perf_counter()))
    rate = _steady_rate(stamps, 5)
    return (1.0 / rate if rate else None), summary


def bench_overhead(
    cluster: str,
    queries: int,
    repeats: int,
    folder: Path,
    models_tried: tuple[str, ...] = ("fake", "default"),
) -> dict[str, Any]:
    from fakes import FakeEmbedder, FakeStudent
    from icdistill.models.reference import ReferenceTeacher
    from icdistill.runner import Parts, RunConfig, build_parts

    out: dict[str, Any] = {}
    for models in models_tried:
        per: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
        for rep in range(repeats):
            for pool in ("sqlite", "postgresql"):
                cfg = RunConfig(n=queries, budget=0.1, pool=_db(cluster) if pool == "postgresql" else None)
                if models == "fake":
                    parts = Parts(FakeStudent(), ReferenceTeacher(), FakeEmbedder())
                else:
                    parts = build_parts(cfg)
                s_per_q, _ = _one_run(cfg, folder / f"overhead-{models}-{pool}-{rep}", parts)
                per[pool].append(s_per_q or 0.0)
                print(
                    json.dumps(
                        {"models": models, "pool": pool, "ms_per_query": round(1000 * (s_per_q or 0), 2)}
                    ),
                    flush=True,
                )
        sq, pg = statistics.median(per["sqlite"]), statistics.median(per["postgresql"])
        out[models] = {
            "ms_per_query_sqlite": [round(1000 * x, 2) for x in per["sqlite"]],
            "ms_per_query_postgresql": [round(1000 * x, 2) for x in per["postgresql"]],
            "median_overhead_ms": round(1000 * (pg - sq), 2),
            "ratio_pg_over_sqlite": round(pg / sq, 3) if sq else None,
        }
    return out


_WATCHER = """
import sys, time, json
from icdistill.pool import PostgresPool
url, trials = sys.argv[1], int(sys.argv[2])
with PostgresPool(url) as pool:
    print("ready", flush=True)
    seen = 0
    while seen < trials:
        pool.refresh()
        n = len(pool._demos)
        if n > seen:
            print(json.dumps({"n": n, "t": time.time()}), flush=True)
            seen = n
        time.sleep(0.001)
"""


def bench_notify(cluster: str, trials: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests" / "pool"))
    from test_pool_pg import ann, emb, item

    from icdistill.pool import PostgresPool

    url = _db(cluster)
    with PostgresPool(url) as a:
        watcher = subprocess.Popen(
            [sys.executable, "-c", _WATCHER, url, str(trials)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "ready"
        delays = []
        for i in range(trials):
            a.add(item(i), ann("a"), emb(i))
            t_commit = time.time()
            seen = json.loads(watcher.stdout.readline())
            delays.append(seen["t"] - t_commit)
            time.sleep(0.05)
        watcher.wait(timeout=60)
    ms = sorted(1000 * d for d in delays)
    return {
        "trials": trials,
        "median_ms": round(statistics.median(ms), 2),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2),
        "max_ms": round(ms[-1], 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--parts", default="actors,overhead,notify")
    p.add_argument("--workers", default="1,2", help="actors: the actor counts, in this order")
    p.add_argument(
        "--models", default="fake,default", help="overhead: with the fakes, the default models or both"
    )
    args = p.parse_args(argv)
    # a SIGTERM (a stopped benchmark) still stops the throwaway cluster and the local Ray instance
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wanted = set(args.parts.split(","))
    result: dict[str, Any] = {"queries": args.queries, "repeats": args.repeats, "cpus": os.cpu_count()}
    folder = Path(tempfile.mkdtemp(prefix="icd-bench-shards-"))
    with throwaway_cluster() as cluster:
        if "notify" in wanted:
            result["notify"] = bench_notify(cluster, args.trials)
            print(json.dumps({"notify": result["notify"]}), flush=True)
        if "overhead" in wanted:
            result["overhead"] = bench_overhead(
                cluster, args.queries, args.repeats, folder, tuple(args.models.split(","))
            )
        if "actors" in wanted:
            result["actors"] = bench_actors(
                cluster, args.queries, args.repeats, folder, tuple(int(w) for w in args.workers.split(","))
            )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
