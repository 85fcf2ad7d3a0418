"""Pool search at 10k / 100k / 1M demos: the HNSW index (icdistill.pool.index) against exact search, same run.

Usage: ``nice -n 19 .venv/bin/python benchmarks/bench_pool_search.py [--quick] [--sizes 10000,100000]
[--dims 384,1280] [--data lowrank] [--queries 200] [--k 8] [--ef-search 96,160] [--faiss]``.

Vectors have the structure of real embeddings, not uniform noise (on uniform random unit vectors
nearest neighbours are meaningless: every point is nearly equidistant): a mixture of 2,000 clusters
of Zipf-distributed sizes, each with its own spread; queries are fresh draws from the same mixture.
``--data lowrank`` (default) shapes each cluster like real embeddings (a few directions of variation,
matched to the local intrinsic dimension of real Fashion-MNIST pool embeddings), ``--data isotropic``
spreads clusters over every direction (a harder case than real data), ``--data npz:PATH:KEY`` reads
real embeddings (``benchmarks/embed_fmnist.py`` writes them). Each row reports the data's local
intrinsic dimension and relative contrast, so runs on different data can be compared.
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

from icdistill.pool import IndexConfig, VectorIndex, unit_rows

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


class LowRankMixture(Mixture):
    """Clusters that vary along a few directions each, as real embeddings do.

    ``Mixture`` spreads every cluster evenly over all ``dim`` directions: inside a big cluster the
    nearest neighbours are then nearly equidistant (the uniform-random problem), which is harder than
    real embeddings. Here each cluster has its own ``rank``-dimensional subspace with a power-law
    spectrum, plus isotropic noise, and clusters are tighter; the defaults were set so that the local
    intrinsic dimension and relative contrast come close to real pool embeddings of Fashion-MNIST
    (EfficientNet 1280-d image features: LID 19.5, contrast 1.82; this mixture at 1280-d: 14.0 and
    1.77, at 20k vectors; the real 384-d ConSE vectors are far easier: 8.5 and 3.33). See
    BENCHMARKS.md section 7.
    """

    def __init__(
        self,
        dim: int,
        clusters: int = CLUSTERS,
        seed: int = 0,
        rank: int = 64,
        noise: float = 1.5,
        tightness: float = 0.4,
        decay: float = 0.5,
    ) -> None:
        super().__init__(dim, clusters, seed)
        rng = np.random.default_rng(seed + 1)
        self.rank = min(rank, dim)
        self.noise = noise
        self.spread = self.spread * tightness
        # per cluster: rank directions (not orthogonalised: random directions in high dim nearly are)
        self.bases = (rng.standard_normal((clusters, self.rank, dim)) / np.sqrt(dim)).astype(np.float32)
        self.scales = (1.0 / np.arange(1, self.rank + 1) ** decay).astype(np.float32)
        self.scales /= np.sqrt(np.sum(self.scales**2))

    def draw(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        c = rng.choice(len(self.centres), size=n, p=self.weights)
        out = np.empty((n, self.dim), dtype=np.float32)
        order = np.argsort(c, kind="stable")
        bounds = np.flatnonzero(np.diff(c[order])) + 1
        for rows in np.split(order, bounds):
            k = int(c[rows[0]])
            z = rng.standard_normal((len(rows), self.rank)).astype(np.float32) * self.scales
            iso = rng.standard_normal((len(rows), self.dim)).astype(np.float32) * (
                self.noise / np.sqrt(self.dim)
            )
            out[rows] = self.centres[k] + self.spread[k] * np.sqrt(self.dim) * (z @ self.bases[k] + iso)
        return unit_rows(out)


class Embeddings:
    """Real embeddings from an ``.npz`` file (one array per key, e.g. written by
    ``benchmarks/embed_fmnist.py``): the first rows are the queries, the next the timed adds, the rest
    the pool; sizes above what the file holds are refused."""

    def __init__(self, path: str, key: str, queries: int, adds: int) -> None:
        with np.load(path, allow_pickle=False) as z:
            self.rows = unit_rows(z[key])
        self.dim = self.rows.shape[1]
        self.q, self.a = queries, adds
        self.capacity = len(self.rows) - queries - adds

    def draw(self, n: int, seed: int) -> np.ndarray:
        if seed == QUERY_SEED:
            return self.rows[:n]
        if seed == ADD_SEED:
            return self.rows[self.q : self.q + n]
        raise AssertionError("pool rows come from pool_rows()")

    def pool_rows(self, lo: int, hi: int) -> np.ndarray:
        if hi > self.capacity:
            raise SystemExit(f"the file holds {self.capacity} pool rows, {hi} asked")
        start = self.q + self.a
        return self.rows[start + lo : start + hi]


QUERY_SEED, ADD_SEED = 10**6, 10**6 + 1


def make_data(spec: str, dim: int, args: argparse.Namespace) -> Any:
    """``isotropic`` (Mixture), ``lowrank`` (LowRankMixture) or ``npz:PATH:KEY`` (real embeddings)."""
    if spec == "isotropic":
        return Mixture(dim)
    if spec == "lowrank":
        return LowRankMixture(dim)
    if spec.startswith("npz:"):
        path, _, key = spec[4:].rpartition(":")
        return Embeddings(path, key, args.queries, args.adds)
    raise SystemExit(f"unknown --data {spec!r}: isotropic, lowrank or npz:PATH:KEY")


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def exact_truth(mat: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return exact_truth_and_structure(mat, queries, k)[0]


def exact_truth_and_structure(
    mat: np.ndarray, queries: np.ndarray, k: int, lid_k: int = 20
) -> tuple[np.ndarray, dict[str, float]]:
    """Exact top-k ids per query, and how hard the data is for a graph search: the local intrinsic
    dimension (Levina-Bickel MLE over the ``lid_k`` nearest) and the relative contrast (mean distance
    over k-th neighbour distance, He et al. 2012); uniform noise has LID ~ dim and contrast ~ 1."""
    out, lids, contrasts = [], [], []
    kk = max(k, lid_k)
    for q in queries:
        s = mat @ q
        top = np.argpartition(-s, kk)[:kk]
        top = top[np.argsort(-s[top], kind="stable")]
        out.append(top[:k])
        d = np.sqrt(np.maximum(2.0 - 2.0 * s[top], 1e-12))
        lids.append(1.0 / max(float(np.mean(np.log(d[lid_k - 1] / d[: lid_k - 1]))), 1e-9))
        contrasts.append(float(np.sqrt(np.maximum(2.0 - 2.0 * s, 0.0)).mean() / d[k - 1]))
    structure = {
        "lid_mle20": round(float(np.median(lids)), 1),
        f"relative_contrast_at_{k}": round(float(np.median(contrasts)), 3),
    }
    return np.asarray(out), structure


def recall(got: list[np.ndarray], truth: np.ndarray, k: int) -> float:
    return round(
        float(
            np.mean([len(set(g[:k].tolist()) & set(t.tolist())) / k for g, t in zip(got, truth, strict=True)])
        ),
        4,
    )


def bench_one(n: int, dim: int, args: argparse.Namespace) -> dict[str, Any]:
    mix = make_data(args.data, dim, args)
    dim = mix.dim
    # the graph answers every query; exact is measured separately
    efs = [int(e) for e in str(args.ef_search).split(",")]
    cfg = IndexConfig(
        exact_below=0,
        expansion_search=efs[0],
        expansion_add=args.expansion_add,
        connectivity=args.connectivity,
        dtype=args.dtype,
    )
    index = VectorIndex(dim, cfg)
    chunk = 50_000
    t0 = time.perf_counter()
    gen_s = 0.0
    for lo in range(0, n, chunk):
        tg = time.perf_counter()
        m = min(chunk, n - lo)
        x = mix.pool_rows(lo, lo + m) if isinstance(mix, Embeddings) else mix.draw(m, seed=1 + lo // chunk)
        gen_s += time.perf_counter() - tg
        index.add(np.arange(lo, lo + len(x)), x, threads=args.threads)
        if n > chunk:
            done = lo + len(x)
            print(
                f"[build {n}x{dim}] {done}/{n} ({time.perf_counter() - t0 - gen_s:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    build_s = time.perf_counter() - t0 - gen_s
    queries = mix.draw(args.queries, seed=QUERY_SEED)
    _, mat = index.matrix()
    truth, structure = exact_truth_and_structure(mat, queries, args.k)

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
    extra = mix.draw(args.adds, seed=ADD_SEED)
    for j, v in enumerate(extra):
        t = time.perf_counter()
        index.add([n + j], v[None])
        add_ms.append((time.perf_counter() - t) * 1e3)
    row: dict[str, Any] = {
        "n": n,
        "dim": dim,
        "data": args.data,
        "k": args.k,
        "build_s": round(build_s, 1),
        "build_threads": args.threads,
        "data_structure": structure,
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
    p.add_argument("--expansion-add", type=int, default=IndexConfig().expansion_add)
    p.add_argument(
        "--data",
        default="lowrank",
        help="lowrank (clusters shaped like real embeddings), isotropic (a harder worst case) or "
        "npz:PATH:KEY (real embeddings, e.g. from benchmarks/embed_fmnist.py)",
    )
    p.add_argument("--dtype", default=IndexConfig().dtype, help="graph storage: bf16, f16, f32, i8")
    p.add_argument("--faiss", action="store_true", help="also measure FAISS HNSW32 on the same vectors")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.adds = "10000", 100, 100
    sizes = [int(s) for s in args.sizes.split(",")]
    dims = [0] if args.data.startswith("npz:") else [int(d) for d in args.dims.split(",")]
    t0 = time.perf_counter()
    rows = [bench_one(n, d, args) for d in dims for n in sizes]
    cfg = IndexConfig(
        expansion_search=int(args.ef_search.split(",")[0]),
        expansion_add=args.expansion_add,
        connectivity=args.connectivity,
        dtype=args.dtype,
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
        "data": args.data,
        "cpus": os.cpu_count(),
        "seconds": round(time.perf_counter() - t0, 1),
        "results": {f"{r['n']}x{r['dim']}": r for r in rows},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
