"""Pool search at 10k / 100k / 1M demos: the HNSW index (icdistill.index) against exact search, same run.

Usage: ``nice -n 19 .venv/bin/python benchmarks/bench_pool_search.py [--quick] [--sizes 10000,100000]
[--dims 384,1280] [--queries 200] [--k 8] [--faiss]``.

Vectors have the structure of real embeddings, not uniform noise (on uniform random unit vectors
nearest neighbours are meaningless: every point is nearly equidistant): a mixture of 2,000 clusters
of Zipf-distributed sizes, each with its own spread; queries are fresh draws from the same mixture.
For each size and dimension it reports single-query p50/p99 latency and recall@k of the index against
exact search (a vectorised numpy scan of the same matrix), build time, the cost of adding one demo to
a built index, and memory. ``--faiss`` also measures FAISS HNSW32 (``pip install faiss-cpu``) on the
same data: the measurement behind choosing usearch. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

# one BLAS thread: a single-query matrix-vector product gains nothing from two, and on a loaded
# machine a second spinning thread made the exact scan 16x slower (1.0 -> 16 ms at 10k x 384)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from icdistill.index import IndexConfig, VectorIndex, unit_rows  # noqa: E402

CLUSTERS = 2000


class Mixture:
    """A fixed mixture of Gaussian clusters on the unit sphere; ``draw`` is reproducible per seed."""

    def __init__(self, dim: int, clusters: int = CLUSTERS, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centres = unit_rows(rng.standard_normal((clusters, dim)))
        w = 1.0 / np.arange(1, clusters + 1) ** 0.8  # a few big clusters, a long tail of small ones
        self.weights = w / w.sum()
        # within-cluster spread relative to the centre: neighbours are mostly, not all, same-cluster
        self.spread = rng.uniform(0.5, 1.2, clusters).astype(np.float32) / np.sqrt(dim)

    def draw(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        c = rng.choice(len(self.centres), size=n, p=self.weights)
        noise = rng.standard_normal((n, self.dim)).astype(np.float32) * self.spread[c, None]
        return unit_rows(self.centres[c] + noise)


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def exact_truth(mat: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = []
    for q in queries:
        s = mat @ q
        top = np.argpartition(-s, k)[:k]
        out.append(top[np.argsort(-s[top], kind="stable")])
    return np.asarray(out)


def recall(got: list[np.ndarray], truth: np.ndarray, k: int) -> float:
    return round(
        float(
            np.mean([len(set(g[:k].tolist()) & set(t.tolist())) / k for g, t in zip(got, truth, strict=True)])
        ),
        4,
    )


def bench_one(n: int, dim: int, args: argparse.Namespace) -> dict[str, Any]:
    mix = Mixture(dim)
    # the graph answers every query; exact is measured separately
    efs = [int(e) for e in str(args.ef_search).split(",")]
    cfg = IndexConfig(
        exact_below=0, expansion_search=efs[0], connectivity=args.connectivity, dtype=args.dtype
    )
    index = VectorIndex(dim, cfg)
    chunk = 50_000
    t0 = time.perf_counter()
    gen_s = 0.0
    for lo in range(0, n, chunk):
        tg = time.perf_counter()
        x = mix.draw(min(chunk, n - lo), seed=1 + lo // chunk)
        gen_s += time.perf_counter() - tg
        index.add(np.arange(lo, lo + len(x)), x, threads=args.threads)
    build_s = time.perf_counter() - t0 - gen_s
    queries = mix.draw(args.queries, seed=10**6)
    _, mat = index.matrix()
    truth = exact_truth(mat, queries, args.k)

    exact_ms: list[float] = []
    for q in queries:
        t = time.perf_counter()
        index.search(q, args.k, exact=True)
        exact_ms.append((time.perf_counter() - t) * 1e3)
    by_ef: dict[str, Any] = {}
    for ef in efs:
        index.set_expansion_search(ef)
        ann_ms, got = [], []
        for q in queries:
            t = time.perf_counter()
            ids, _ = index.search(q, args.k)
            ann_ms.append((time.perf_counter() - t) * 1e3)
            got.append(ids)
        by_ef[str(ef)] = {**percentiles(ann_ms), "recall_at_k": recall(got, truth, args.k)}
    index.set_expansion_search(efs[0])
    add_ms = []
    extra = mix.draw(args.adds, seed=10**6 + 1)
    for j, v in enumerate(extra):
        t = time.perf_counter()
        index.add([n + j], v[None])
        add_ms.append((time.perf_counter() - t) * 1e3)
    row: dict[str, Any] = {
        "n": n,
        "dim": dim,
        "k": args.k,
        "build_s": round(build_s, 1),
        "build_threads": args.threads,
        "index_memory_mb": round(index.memory_bytes() / 2**20, 1),
        "peak_rss_mb": round(rss_mb(), 1),
        "exact": percentiles(exact_ms),
        "ann": {**by_ef[str(efs[0])], "expansion_search": efs[0]},
        "ann_by_expansion_search": by_ef,
        "add_one": percentiles(add_ms),
    }
    row["ann_speedup_p50"] = round(row["exact"]["p50_ms"] / max(row["ann"]["p50_ms"], 1e-6), 1)
    if args.faiss:
        row["faiss_hnsw32"] = bench_faiss(mat, queries, truth, args)
    print(json.dumps(row), file=sys.stderr, flush=True)
    del index, mat
    return row


def bench_faiss(
    mat: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    try:
        import faiss
    except ImportError:
        return {"skipped": "faiss-cpu is not installed"}
    faiss.omp_set_num_threads(args.threads)
    idx = faiss.IndexHNSWFlat(mat.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    idx.hnsw.efConstruction = 64
    t = time.perf_counter()
    idx.add(mat)
    build_s = time.perf_counter() - t
    idx.hnsw.efSearch = 96
    faiss.omp_set_num_threads(1)  # single-query search, like the pool's
    ms, got = [], []
    for q in queries:
        t = time.perf_counter()
        _, ids = idx.search(q[None], args.k)
        ms.append((time.perf_counter() - t) * 1e3)
        got.append(ids[0])
    add_ms = []
    for q in queries[: args.adds]:
        t = time.perf_counter()
        idx.add(q[None])
        add_ms.append((time.perf_counter() - t) * 1e3)
    return {
        "build_s": round(build_s, 1),
        **percentiles(ms),
        "recall_at_k": recall(got, truth, args.k),
        "add_one": percentiles(add_ms),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10k vectors only, fewer queries (under a minute)")
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--dims", default="384,1280")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--adds", type=int, default=200, help="single-demo adds timed after the build")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for the bulk build")
    p.add_argument(
        "--ef-search",
        default=str(IndexConfig().expansion_search),
        help="HNSW search expansion; a list (96,160) measures each on the same graph, the first is 'ann'",
    )
    p.add_argument("--connectivity", type=int, default=IndexConfig().connectivity)
    p.add_argument("--dtype", default=IndexConfig().dtype, help="graph storage: bf16, f16, f32, i8")
    p.add_argument("--faiss", action="store_true", help="also measure FAISS HNSW32 on the same vectors")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.adds = "10000", 100, 100
    sizes = [int(s) for s in args.sizes.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    t0 = time.perf_counter()
    rows = [bench_one(n, d, args) for d in dims for n in sizes]
    cfg = IndexConfig(
        expansion_search=int(args.ef_search.split(",")[0]), connectivity=args.connectivity, dtype=args.dtype
    )
    result = {
        "benchmark": "pool_search",
        "backend": "usearch HNSW",
        "config": {
            "connectivity": cfg.connectivity,
            "expansion_add": cfg.expansion_add,
            "expansion_search": cfg.expansion_search,
            "dtype": cfg.dtype,
        },
        "data": f"mixture of {CLUSTERS} clusters (Zipf sizes), unit vectors",
        "cpus": os.cpu_count(),
        "seconds": round(time.perf_counter() - t0, 1),
        "results": {f"{r['n']}x{r['dim']}": r for r in rows},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
