"""How much a micro-batch can gain on this machine at most: the rate (GFLOP/s) of the matrix products
a VLM student's forward is made of, at the row counts of one query and of B queries.

A forward's time is its matrix products' (the rest is small at these sizes). Batching B queries
multiplies the rows of each product by B; it can only make a query cheaper where one query's
products run below the machine's rate. If one query's products already run at the rate B queries'
do, no batching gets a 2x, whatever the scheduling: the ceiling on the gain is the ratio of rates.

    python benchmarks/bench_gemm.py --batches 1,8 --dtype bfloat16 --repeats 5

The shapes are SmolVLM-256M-Instruct's published ones (a 512-px tile: 1024 patches through SigLIP
12 x 768 with a 3072 MLP; ~300 prompt tokens through the 576-wide text model with a 1536 MLP) and
LLaVA-OneVision-0.5B's (729 patches through SigLIP-so400m 1152 / 4304; ~2,300 prompt tokens
through Qwen2-0.5B, 896 / 4864).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

# (name, rows for one query, inner, outer): the largest products of each part, as in one layer
SHAPES = {
    "smolvlm vision qkv": (1024, 768, 2304),
    "smolvlm vision mlp": (1024, 768, 3072),
    "smolvlm text mlp": (300, 576, 1536),
    "smolvlm text attn": (300, 576, 576),
    "llava-ov vision mlp": (729, 1152, 4304),
    "llava-ov text mlp": (2300, 896, 4864),
}


def rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """GFLOP/s of ``(m, k) @ (k, n)``, the median of ``repeats`` timings of enough products for ~0.2 s."""
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    flops = 2.0 * m * k * n
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    a @ b
    once = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, int(0.2 / once))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        times.append((time.perf_counter() - t0) / reps)
    return flops / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    print(
        "| product | rows a query | "
        + " | ".join(f"GFLOP/s at B={b}" for b in batches)
        + " | ceiling B=max / B=1 |"
    )
    print("|---|---|" + "---|" * len(batches) + "---|")
    for name, (m, k, n) in SHAPES.items():
        rates = [rate(m * b, k, n, dtype, args.repeats) for b in batches]
        rows.append({"product": name, "rows": m, "k": k, "n": n, "batches": batches, "gflops": rates})
        cells = " | ".join(f"{r:.0f}" for r in rates)
        print(f"| {name} ({k} x {n}) | {m} | {cells} | {rates[-1] / rates[0]:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"dtype": args.dtype, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
