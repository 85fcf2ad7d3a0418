"""What ICD adds per query besides the models: demo selection + gate + pool add, at pools of 1k..1M.

Usage: ``nice -n 19 .venv/bin/python benchmarks/bench_overhead.py [--quick] [--sizes 1000,100000]
[--image-dim 1280] [--text-dim 384] [--selectors image,cross-modal] [--no-student]``.

Models are replaced by synthetic embeddings with the structure of a classification stream (every
prompt the same text, ten answers, images from a mixture of 2,000 clusters), so what is timed is the
project's own code: the real ``SQLitePool`` (file on disk, its vector index), the real selectors and
the real ``BudgetGate`` at a 10% rate. Pools are filled in bulk (one transaction) and opened once
(building the index: timed as ``open_s``) and again (reusing the saved index: ``reopen_s``).
Per query: ``select`` for each selector, ``gate`` (decide + observe), ``add`` (only on the queries the
gate sends to the teacher: a committed SQLite transaction), and ``per_query`` = select (first
selector) + gate + rate x add. Unless ``--no-student``, the student forward of the offline default
(``local:smollm2`` on Fashion-MNIST, 2 demos) is timed in the same run and every size gets
``overhead_vs_student``. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# single-query matrix-vector products: one BLAS thread (see bench_pool_search.py)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_pool_search import LowRankMixture, Mixture, percentiles  # noqa: E402

from icdistill.gate import BudgetGate  # noqa: E402
from icdistill.pool import (
    SQLitePool,  # noqa: E402
    unit_rows,
)
from icdistill.select import make_selector  # noqa: E402
from icdistill.types import ANSWER, IMAGE, IMAGE_TEXT, TEXT, Annotation, GateContext, Query  # noqa: E402

LABELS = tuple(f"class {i}" for i in range(10))
PROMPT = "What is shown in this image?"
RATE = 0.10
WARM = 500  # queries the gate has seen before the timed ones


class Stream:
    """Synthetic query embeddings: one prompt vector, ten answer vectors, images from a mixture whose
    cluster decides the label (so image neighbours mostly share an answer, as with real features)."""

    def __init__(self, image_dim: int, text_dim: int, data: str = "lowrank") -> None:
        rng = np.random.default_rng(42)
        self.images = LowRankMixture(image_dim) if data == "lowrank" else Mixture(image_dim)
        self.text = unit_rows(rng.standard_normal((1, text_dim)))[0]
        self.answers = unit_rows(rng.standard_normal((len(LABELS), text_dim)))
        self.text_dim = text_dim

    def batch(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image vectors, labels, and each image's placement in the text space (ConSE-like)."""
        rng = np.random.default_rng(seed)
        x = self.images.draw(n, seed)
        labels = (np.abs(x[:, :8].sum(axis=1) * 1e3).astype(np.int64)) % len(LABELS)
        it = unit_rows(
            self.answers[labels] + 0.8 * rng.standard_normal((n, self.text_dim)) / np.sqrt(self.text_dim)
        )
        return x, labels, it


def bulk_fill(path: Path, n: int, stream: Stream) -> float:
    """A pool file with ``n`` accepted demos, written in one transaction (bypassing per-add fsyncs)."""
    SQLitePool(path).close()  # the schema
    db = sqlite3.connect(str(path))
    t0 = time.perf_counter()
    chunk = 20_000
    opts = json.dumps(list(LABELS))
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        x, labels, _ = stream.batch(m, seed=lo // chunk)
        ann_rows = [
            (
                f"p{lo + j}",
                lo + j,
                PROMPT,
                opts,
                LABELS[labels[j]],
                1,
                1,
                "added",
                "bench",
                "{}",
                1.0,
                time.time(),
            )
            for j in range(m)
        ]
        db.executemany(
            "INSERT INTO annotations (query_id, position, prompt, options, answer, accepted, in_pool, status, "
            "teacher, votes, agreement, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ann_rows,
        )
        first = db.execute("SELECT id FROM annotations WHERE query_id = ?", (f"p{lo}",)).fetchone()[0]
        emb_rows: list[tuple[int, str, bytes]] = []
        for j in range(m):
            emb_rows.append((first + j, IMAGE, x[j].tobytes()))
            emb_rows.append((first + j, TEXT, stream.text.tobytes()))
            emb_rows.append((first + j, ANSWER, stream.answers[labels[j]].tobytes()))
        db.executemany("INSERT INTO embeddings (demo_id, key, vec) VALUES (?, ?, ?)", emb_rows)
    db.commit()
    db.close()
    return time.perf_counter() - t0


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _demo_rows(path: Path) -> int:
    db = sqlite3.connect(str(path))
    try:
        return int(db.execute("SELECT COUNT(*) FROM annotations WHERE in_pool = 1").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        db.close()


def ann(answer: str) -> Annotation:
    return Annotation(
        answer=answer, samples=[answer], votes={answer: 1}, agreement=1.0, accepted=True, teacher="bench"
    )


def bench_size(n: int, stream: Stream, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    path = folder / f"pool_{n}_{args.image_dim}_{args.text_dim}_{args.data}.sqlite"
    fill_s = None
    if path.exists() and _demo_rows(path) < n:  # a fill that was killed: start again
        path.unlink()
        shutil.rmtree(f"{path}.index", ignore_errors=True)
    if not path.exists():
        fill_s = bulk_fill(path, n, stream)
    t = time.perf_counter()
    pool = SQLitePool(path)
    open_s = time.perf_counter() - t
    open_rss_mb = _peak_rss_mb()  # the peak so far: the first open (and a graph build, if any)
    status = pool.index_status()
    pool.close()
    del pool  # before the reopen: a 1M-demo pool is ~10 GB, two of them do not fit in 24 GB
    gc.collect()
    t = time.perf_counter()
    pool = SQLitePool(path)
    reopen_s = time.perf_counter() - t
    reopen_status = pool.index_status()

    selectors = {name: make_selector(name) for name in args.selectors.split(",")}
    scan_pool = ScanOnly(pool)
    gate = BudgetGate(RATE, warmup=0)
    rng = np.random.default_rng(0)
    calls = 0
    # a gate that has seen a stream already (past its cold start), spending at its rate
    for t in range(WARM):
        ctx = GateContext(t, calls, n)
        asked = gate.decide(float(rng.random()), ctx).ask
        gate.observe(float(rng.random()), ctx, asked)
        calls += int(asked)
    x, labels, it = stream.batch(args.queries, seed=10**6 + n)
    times: dict[str, list[float]] = {name: [] for name in selectors}
    times.update({f"{name} (scan)": [] for name in selectors})
    same: dict[str, list[bool]] = {name: [] for name in selectors}
    times["gate"], times["add"] = [], []
    asked_here = 0
    token = uuid.uuid4().hex[:8]  # a cached pool keeps earlier runs' demos: these must be new ones
    for j in range(args.queries):
        q = Query(id=f"bench{n}-{token}-{j}", image=None, prompt=PROMPT, options=LABELS, position=WARM + j)
        emb = {IMAGE: x[j], TEXT: stream.text, IMAGE_TEXT: it[j]}
        for name, sel in selectors.items():
            t = time.perf_counter()
            demos = sel.select(q, emb, pool, args.shots)
            times[name].append((time.perf_counter() - t) * 1e3)
            assert len(demos) == args.shots
            if j < args.scan_queries:
                # baseline, same run: the same selector on the bare Pool protocol (exact scans)
                t = time.perf_counter()
                scanned = sel.select(q, emb, scan_pool, args.shots)
                times[f"{name} (scan)"].append((time.perf_counter() - t) * 1e3)
                # the graph is approximate: count how often it picks what the exact scan picks
                same[name].append([d.id for d in scanned] == [d.id for d in demos])
        u = float(rng.random())  # the student's uncertainty (its forward is timed apart)
        t = time.perf_counter()
        ctx = GateContext(q.position, calls, len(pool))
        decision = gate.decide(u, ctx)
        gate.observe(u, ctx, decision.ask)
        times["gate"].append((time.perf_counter() - t) * 1e3)
        if decision.ask:
            calls += 1
            asked_here += 1
            t = time.perf_counter()
            _, added = pool.add(q, ann(LABELS[labels[j]]), {**emb, ANSWER: stream.answers[labels[j]]})
            times["add"].append((time.perf_counter() - t) * 1e3)
            assert added == "added", added
    pool.close()
    first = args.selectors.split(",")[0]
    row: dict[str, Any] = {
        "n": n,
        "dims": {"image": args.image_dim, "text": args.text_dim},
        "fill_s": None if fill_s is None else round(fill_s, 1),
        "open_s": round(open_s, 2),
        "index_on_open": status,
        "reopen_s": round(reopen_s, 2),
        "index_on_reopen": reopen_status,
        "select": {name: percentiles(times[name]) for name in selectors},
        "select_scan_baseline": {name: percentiles(times[f"{name} (scan)"]) for name in selectors},
        "same_demos_as_scan": {name: round(float(np.mean(same[name])), 3) for name in selectors},
        "gate": percentiles(times["gate"]),
        "add": {**(percentiles(times["add"]) if times["add"] else {}), "count": len(times["add"])},
        "teacher_rate": round(asked_here / args.queries, 3),
        "peak_rss_open_mb": open_rss_mb,
        "peak_rss_mb": _peak_rss_mb(),
    }
    add_mean = float(np.mean(times["add"])) if times["add"] else 0.0
    row["per_query_ms"] = round(
        float(np.median(times[first])) + float(np.median(times["gate"])) + row["teacher_rate"] * add_mean, 3
    )
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


class ScanOnly:
    """The bare ``Pool`` protocol of a pool (no ``search``, no ``kind_ids``): selectors fall back to
    scoring every demo with one vectorised matrix product per stage (the pre-index behaviour, minus
    its per-demo Python dict)."""

    def __init__(self, pool: SQLitePool) -> None:
        self._pool = pool

    def __len__(self) -> int:
        return len(self._pool)

    def demos(self) -> list[Any]:
        return self._pool.demos()

    def vectors(self, key: str) -> tuple[list[int], np.ndarray]:
        return self._pool.vectors(key)

    def get(self, demo_id: int) -> Any:
        return self._pool.get(demo_id)


def student_forward_ms(n_queries: int) -> dict[str, Any]:
    """The offline default student's forward on Fashion-MNIST queries with 2 demos (same run)."""
    from icdistill.data.fashion_mnist import load_fashion_mnist
    from icdistill.models.registry import ModelContext, resolve_student
    from icdistill.types import Demo

    ds = load_fashion_mnist("test")
    student = resolve_student("local:smollm2", ModelContext())
    items = [ds.item(i) for i in range(n_queries + 2)]
    demos = [
        Demo(id=i, query_id=q.id, image=q.image, prompt=q.prompt, answer=q.label or "")
        for i, q in enumerate(items[:2])
    ]
    student.predict(items[2], demos)  # warm-up (first call builds caches)
    ms = []
    for q in items[2:]:
        t = time.perf_counter()
        student.predict(q, demos)
        ms.append((time.perf_counter() - t) * 1e3)
    return {"spec": "local:smollm2", "queries": len(ms), **percentiles(ms)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="pools of 1k and 10k, 100 queries, 3 student forwards"
    )
    p.add_argument("--sizes", default="1000,100000,1000000")
    p.add_argument("--image-dim", type=int, default=1280)
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--selectors", default="image,cross-modal", help="the first one counts in per_query_ms")
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--student-queries", type=int, default=8)
    p.add_argument("--scan-queries", type=int, default=20, help="queries also run through the scan baseline")
    p.add_argument("--no-student", action="store_true")
    p.add_argument(
        "--data",
        choices=("lowrank", "isotropic"),
        default="lowrank",
        help="image vectors: shaped like real embeddings, or the harder isotropic clusters (see bench_pool_search)",
    )
    p.add_argument("--cache", default=None, help="folder to keep the filled pools in (reused when present)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.student_queries, args.scan_queries = "1000,10000", 100, 3, 10
    stream = Stream(args.image_dim, args.text_dim, args.data)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.cache) if args.cache else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        rows = [bench_size(int(s), stream, args, folder) for s in args.sizes.split(",")]
    result: dict[str, Any] = {
        "benchmark": "overhead",
        "selectors": args.selectors.split(","),
        "shots": args.shots,
        "gate": f"budget {RATE}",
        "data": args.data,
        "cpus": os.cpu_count(),
        "results": {str(r["n"]): r for r in rows},
    }
    if not args.no_student:
        result["student_forward"] = student = student_forward_ms(args.student_queries)
        for r in rows:
            r["overhead_vs_student"] = round(r["per_query_ms"] / student["p50_ms"], 5)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
