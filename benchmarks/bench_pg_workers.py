"""Throughput of 1, 2 and 4 ``icd run`` workers on one shared PostgreSQL pool, offline default models.

Usage: ``nice -n 19 .venv/bin/python benchmarks/bench_pg_workers.py [--queries 48] [--workers 1,2,4]``.

Starts a throwaway PostgreSQL cluster (Debian's server, as in the tests), then for each worker count
W runs W processes of ``icd run --pool postgresql://...`` (student ``local:smollm2``, embedder
``local:conse``, ``reference`` teacher, 10% budget), each on its own seed and ``queries / W`` queries
of Fashion-MNIST, all on one fresh database. Reports wall time from launch to the last exit (model
loading included), queries per second, teacher calls bought (ledger) and pooled demos. On a 2-core
machine this shows the cost of sharing, not a speed-up: every worker loads its own models and they
compete for the same cores. The last line printed is one JSON object.

``--restart-trial N``: instead, N ``pg_ctl -m fast restart`` of the cluster under 3 running workers
(the shared-pool workers of ``tests/pool/test_pool_pg.py``: a 50 ms fake teacher, so the trial is about the
database, not the models), each restart when the pool has grown by ``--items / (N + 1)``. Reports
each restart's length and how long the workers took to commit again, then whether anything was
lost, bought twice or printed a traceback, and the connections each worker held.

``--rss-trial N``: memory per worker with N pooled demos of the default embedder's shapes (image 1280
+ image-text, text, answer 384 float32: 9,728 bytes of vectors per demo), synthetic unit vectors
written straight into the database. One worker opens the pool first and saves its graphs (the cost of
a new run folder: read every vector, build every graph); then 1, 2 and 4 workers, each with its own
copy of the saved graphs (as ``icd run`` keeps them, one per run folder), open the pool at the same
time and report their RSS, peak RSS, PSS (what they share counts once) and open time.
``--shared`` (issue 18): the same, with the workers of the host sharing one saved, memory-mapped
index (``icdistill.pool.shared_index``): the first worker builds the host's snapshot, then 1, 2 and 4
workers map it. Each worker then runs 200 searches per key and reads every pooled vector once (so
the mapped pages it needs are resident, as in a worker that has been serving a while) before it
reports RSS, PSS and USS (its private pages: what one more worker costs). ``--expansion-add`` builds
the graphs with fewer candidates (faster; a graph's memory depends on its connectivity, not on this).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "pool"))
from pg_cluster import fresh_database, throwaway_cluster  # noqa: E402


def run_workers(url: str, workers: int, queries: int, folder: Path) -> dict[str, Any]:
    per = max(1, queries // workers)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    icd = str(Path(sys.executable).with_name("icd"))
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                icd,
                "run",
                "--pool",
                url,
                "--out",
                str(folder / f"w{workers}-{k}"),
                "--n",
                str(per),
                "--seed",
                str(k),
                "--budget",
                "0.1",
                "--quiet",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for k in range(workers)
    ]
    errors = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            errors.append(err.decode(errors="replace")[-500:])
    wall = time.perf_counter() - t0
    loop_s = []
    for k in range(workers):
        summary = folder / f"w{workers}-{k}" / "summary.json"
        if summary.exists():
            loop_s.append(json.loads(summary.read_text())["wall_seconds_this_session"])
    import psycopg

    with psycopg.connect(url) as conn:
        calls = conn.execute("SELECT calls FROM icd_ledger").fetchone()[0]
        pooled = conn.execute("SELECT COUNT(*) FROM icd_annotations WHERE in_pool").fetchone()[0]
        twins = conn.execute(
            "SELECT COUNT(*) FROM (SELECT image_digest, prompt FROM icd_annotations WHERE in_pool "
            "GROUP BY 1, 2 HAVING COUNT(*) > 1) t"
        ).fetchone()[0]
    total = per * workers
    return {
        "workers": workers,
        "queries": total,
        "wall_s": round(wall, 1),
        "queries_per_s": round(total / wall, 3),
        "loop_s_per_worker": [round(s, 1) for s in loop_s],
        "queries_per_s_in_loop": round(total / max(loop_s), 3) if loop_s else None,
        "teacher_calls": int(calls),
        "pooled": int(pooled),
        "pooled_twice": int(twins),
        "errors": errors,
    }


def restart_trial(admin: str, restarts: int, items: int, folder: Path) -> dict[str, Any]:
    import psycopg
    from test_pool_pg import WORKER

    from icdistill.pool import PostgresPool
    from pg_cluster import restart_cluster

    url = fresh_database(admin, "bench_restarts")
    script = folder / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).resolve().parents[1] / "tests" / "pool"), url=url, n=items, lease_s=120.0))
    PostgresPool(url).close()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"w{k}", str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for k in range(3)
    ]

    def query(sql: str) -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            return int(conn.execute(sql).fetchone()[0])

    stored = "SELECT COUNT(*) FROM icd_annotations"
    trials, connections = [], []
    for r in range(1, restarts + 1):
        while query(stored) < r * items // (restarts + 1) and any(p.poll() is None for p in procs):
            time.sleep(0.01)
        if all(p.poll() is not None for p in procs):
            break
        connections.append(
            query("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        )
        before = query(stored)
        t0 = time.perf_counter()
        restart_cluster(url)
        up = time.perf_counter() - t0
        while query(stored) <= before and any(p.poll() is None for p in procs):
            time.sleep(0.01)
        trials.append({"restart_s": round(up, 2), "first_commit_after_s": round(time.perf_counter() - t0, 2)})
    outs = [p.communicate() for p in procs]
    calls = sum(int(o.split("teacher_calls=")[1]) for o, _ in outs if "teacher_calls=" in o)
    return {
        "workers": 3,
        "items": items,
        "restarts": trials,
        "exit_codes": [p.returncode for p in procs],
        "tracebacks": sum("Traceback" in e for _, e in outs),
        "pooled": query("SELECT COUNT(*) FROM icd_annotations WHERE in_pool"),
        "pooled_twice": query(
            "SELECT COUNT(*) FROM (SELECT image_digest, prompt FROM icd_annotations WHERE in_pool "
            "GROUP BY 1, 2 HAVING COUNT(*) > 1) t"
        ),
        "teacher_calls": calls,
        "ledger_calls": query("SELECT calls FROM icd_ledger"),
        "connections_of_3_workers": connections,
    }


_OPEN_WORKER = """
import json, resource, sys, time
from pathlib import Path
import numpy as np
t0 = time.perf_counter()
from icdistill.pool import IndexConfig, PostgresPool, SharedIndexConfig
mode, folder, expansion_add = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
cfg = IndexConfig(expansion_add=expansion_add)
if mode == "shared":
    pool = PostgresPool(sys.argv[1], index=cfg, shared_index=SharedIndexConfig(folder))
else:
    pool = PostgresPool(sys.argv[1], index=cfg, index_dir=folder)
opened = time.perf_counter() - t0
rng = np.random.default_rng(0)
t1 = time.perf_counter()
for key, dim in DIMS.items():
    for _ in range(200):
        pool.search(key, rng.standard_normal(dim).astype(np.float32), 8)
    ids, mat = pool.vectors(key)
    float(np.asarray(mat, dtype=np.float32).sum())  # every vector read once: its pages resident
used = time.perf_counter() - t1
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
def rollup():
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return out
print(json.dumps({"open_s": round(opened, 1), "search_s": round(used, 1), "rss_mb": round(status("VmRSS:")),
                  "peak_rss_mb": round(status("VmHWM:")), "index": pool.index_status(), "demos": pool.known_size()}),
      flush=True)
sys.stdin.readline()  # every worker has reported and is alive: measure what each maps
r = rollup()
print(json.dumps({"pss_mb": round(r["Pss"]), "uss_mb": round(r["Private_Clean"] + r["Private_Dirty"]),
                  "shared_mb": round(r["Shared_Clean"] + r["Shared_Dirty"])}), flush=True)
sys.stdin.read()  # held open until every worker has been measured
pool.close()  # saves the graphs (the first worker's are the others' copies)
"""

DIMS = {"image": 1280, "image_text": 384, "text": 384, "answer": 384}
_OPEN_WORKER = f"DIMS = {DIMS!r}\n" + _OPEN_WORKER


def fill(url: str, n: int) -> None:
    """``n`` pooled demos with unit vectors of the default embedder's shapes, by binary COPY."""
    import numpy as np
    import psycopg

    from icdistill.pool import PostgresPool

    PostgresPool(url).close()  # the schema
    rng = np.random.default_rng(0)
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY icd_annotations (id, query_id, position, image_digest, prompt, options, answer, accepted, "
            "in_pool, status, teacher, votes, agreement) FROM STDIN"
        ) as cp:
            for i in range(1, n + 1):
                cp.write_row((i, f"q{i}", i, f"d{i}", "what?", '["a", "b"]', "ab"[i % 2], True, True, "added",
                              "t", '{"a": 1}', 1.0))
        cur.execute("SELECT setval('icd_annotations_id_seq', %s)", (n,))
        with cur.copy("COPY icd_embeddings (demo_id, key, vec) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["int8", "text", "bytea"])
            for start in range(1, n + 1, 10_000):
                stop = min(n + 1, start + 10_000)
                for key, dim in DIMS.items():
                    m = rng.standard_normal((stop - start, dim)).astype(np.float32)
                    m /= np.linalg.norm(m, axis=1, keepdims=True)
                    for j, i in enumerate(range(start, stop)):
                        cp.write_row((i, key, m[j].tobytes()))
        conn.commit()


def open_workers(url: str, dirs: list[Path], mode: str = "copies", expansion_add: int = 128) -> list[dict[str, Any]]:
    procs = [
        subprocess.Popen([sys.executable, "-c", _OPEN_WORKER, url, mode, str(d), str(expansion_add)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for d in dirs
    ]
    rows = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
    # PSS while every worker is alive (one that had exited would leave the others its shared pages)
    for p, row in zip(procs, rows, strict=True):
        p.stdin.write("\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
        row.update(json.loads(p.stdout.readline()))  # type: ignore[union-attr]
    for p in procs:
        p.stdin.close()  # type: ignore[union-attr]
        p.wait()
    return rows


def rss_trial(
    admin: str, n: int, counts: list[int], folder: Path, shared: bool = False, expansion_add: int = 128
) -> dict[str, Any]:
    import shutil

    url = fresh_database(admin, "bench_rss")
    t0 = time.perf_counter()
    fill(url, n)
    filled = time.perf_counter() - t0
    mode = "shared" if shared else "copies"
    # builds the graphs: saved in the folder on close (copies), or as the host's snapshot (shared)
    first = open_workers(url, [folder / ("cache" if shared else "saved")], mode, expansion_add)[0]
    print(json.dumps({"mode": mode, "fill_s": round(filled, 1), "first_open": first}), file=sys.stderr, flush=True)
    rows = []
    for w in counts:
        dirs = [folder / "cache"] * w if shared else [folder / f"w{w}-{k}" for k in range(w)]
        if not shared:
            for d in dirs:
                shutil.copytree(folder / "saved", d)
        got = open_workers(url, dirs, mode, expansion_add)
        row = {
            "workers": w,
            "rss_mb_each": [r["rss_mb"] for r in got],
            "peak_rss_mb_each": [r["peak_rss_mb"] for r in got],
            "pss_mb_each": [r["pss_mb"] for r in got],
            "uss_mb_each": [r["uss_mb"] for r in got],
            "pss_mb_total": sum(r["pss_mb"] for r in got),
            "open_s_each": [r["open_s"] for r in got],
            "search_s_each": [r["search_s"] for r in got],
            "index": got[0]["index"],
        }
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
        if not shared:
            for d in dirs:
                shutil.rmtree(d)
    return {"mode": mode, "expansion_add": expansion_add, "demos": n, "fill_s": round(filled, 1),
            "first_open": first, "results": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=48, help="queries in total, split over the workers")
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--restart-trial", type=int, default=0, metavar="N", help="N database restarts under 3 workers")
    p.add_argument("--items", type=int, default=300, help="--restart-trial: items the workers label")
    p.add_argument("--rss-trial", type=int, default=0, metavar="N", help="memory per worker at N demos")
    p.add_argument("--shared", action="store_true", help="--rss-trial: workers share one mapped index")
    p.add_argument("--expansion-add", type=int, default=128, help="--rss-trial: HNSW expansion_add")
    args = p.parse_args(argv)
    # a SIGTERM (e.g. from `timeout`) must still stop the cluster and remove its folder
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.restart_trial:
        with throwaway_cluster() as admin, tempfile.TemporaryDirectory() as tmp:
            out = restart_trial(admin, args.restart_trial, args.items, Path(tmp))
        print(json.dumps({"benchmark": "pg_restarts", "cpus": os.cpu_count(), **out}))
        return 0
    if args.rss_trial:
        with throwaway_cluster() as admin, tempfile.TemporaryDirectory() as tmp:
            counts = [int(x) for x in args.workers.split(",")]
            out = rss_trial(admin, args.rss_trial, counts, Path(tmp), args.shared, args.expansion_add)
        print(json.dumps({"benchmark": "pg_worker_memory", "cpus": os.cpu_count(), **out}))
        return 0
    rows = []
    with throwaway_cluster() as admin, tempfile.TemporaryDirectory() as tmp:
        for w in (int(x) for x in args.workers.split(",")):
            url = fresh_database(admin, f"bench_w{w}")
            row = run_workers(url, w, args.queries, Path(tmp))
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    base = rows[0]["queries_per_s"]
    for r in rows:
        r["throughput_vs_first"] = round(r["queries_per_s"] / base, 2)
    print(json.dumps({"benchmark": "pg_workers", "cpus": os.cpu_count(), "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
