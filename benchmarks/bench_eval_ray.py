"""``icd eval`` in one process vs ``icd eval --ray`` on a local Ray instance: wall time, same results.

Usage: ``nice -n 19 .venv/bin/python benchmarks/bench_eval_ray.py [--n 30] [--ray-cpus 2]
[--methods icd,knn-pool] [--budgets 0.1] [--seeds 0,1] [--out benchmarks/results/eval_ray.json]``.

Runs the same grid twice through the real command line (offline default models: ``local:smollm2``
student, ``local:conse`` embedder, ``reference`` teacher, Fashion-MNIST): once single-process, once
with ``--ray --ray-cpus N`` (one actor per CPU, each loading its own models, one torch thread each).
Wall time is from launch to exit, model loading and Ray's start included. Checks that results.csv is
the same apart from its wall-clock columns. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TIMING = ("seconds_per_query", "student_seconds_per_query", "teacher_seconds_per_query", "peak_rss_mb")


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def cell_seconds(path: Path) -> float:
    """Seconds spent inside the cells' query loops (model loading and Ray's start excluded)."""
    with open(path, newline="") as fh:
        return sum(float(r["seconds_per_query"]) * int(r["n"]) for r in csv.DictReader(fh))


def run(args: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    icd = str(Path(sys.executable).with_name("icd"))
    t0 = time.perf_counter()
    r = subprocess.run([icd, "eval", *args, "--quiet"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"icd eval {' '.join(args)} failed:\n{r.stderr}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--methods", default="icd,knn-pool")
    p.add_argument("--budgets", default="0.1")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--ray-first", action="store_true", help="run the Ray eval before the single-process one")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    a = p.parse_args()
    grid = ["--methods", a.methods, "--budgets", a.budgets, "--seeds", a.seeds, "--n", str(a.n)]
    with tempfile.TemporaryDirectory(prefix="bench-eval-ray-") as tmp:
        single, on_ray = Path(tmp) / "single", Path(tmp) / "ray"
        ray_args = [*grid, "--out", str(on_ray), "--ray", "--ray-cpus", str(a.ray_cpus)]
        if a.ray_first:  # the machine's load drifts: run the two in either order
            t_ray, t_single = run(ray_args), run([*grid, "--out", str(single)])
        else:
            t_single, t_ray = run([*grid, "--out", str(single)]), run(ray_args)
        a_rows, b_rows = rows(single / "results.csv"), rows(on_ray / "results.csv")
        result: dict[str, Any] = {
            "grid": {"methods": a.methods, "budgets": a.budgets, "seeds": a.seeds, "n": a.n},
            "cells": len(a_rows),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "single_process_s": round(t_single, 1),
            "ray_s": round(t_ray, 1),
            "ray_cpus": a.ray_cpus,
            "speedup": round(t_single / t_ray, 2),
            "ray_first": a.ray_first,
            # summed over cells: in one process they run one after another, on Ray side by side
            "single_cell_loop_s": round(cell_seconds(single / "results.csv"), 1),
            "ray_cell_loop_s": round(cell_seconds(on_ray / "results.csv"), 1),
            "same_results": a_rows == b_rows,
            "accuracy": {f"{r['method']} seed {r['seed']}": r["accuracy"] for r in a_rows},
        }
    line = json.dumps(result)
    if a.out is not None:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(line)


if __name__ == "__main__":
    main()
