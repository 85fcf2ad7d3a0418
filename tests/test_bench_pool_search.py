"""The pool-search benchmark runs end to end on tiny sizes and reports what BENCHMARKS.md quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from bench_pool_search import LowRankMixture, Mixture, exact_truth_and_structure  # noqa: E402


def run(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(BENCH / "bench_pool_search.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("data", ["lowrank", "isotropic"])
def test_synthetic_run_reports_latency_recall_and_structure(data: str) -> None:
    res = run(
        "--sizes",
        "5000",
        "--dims",
        "32",
        "--queries",
        "30",
        "--adds",
        "5",
        "--data",
        data,
        "--ef-search",
        "32,64",
    )
    row = res["results"]["5000x32"]
    assert row["data"] == data and res["data"] == data
    for ef in ("32", "64"):
        assert 0.5 <= row["ann_by_expansion_search"][ef]["recall_at_k"] <= 1.0
        assert row["ann_by_expansion_search"][ef]["p50_ms"] > 0
    assert set(row["data_structure"]) == {"lid_mle20", "relative_contrast_at_8"}
    assert row["add_one"]["p50_ms"] > 0 and row["exact"]["p50_ms"] > 0


def test_real_embeddings_file(tmp_path: Path) -> None:
    rows = LowRankMixture(48).draw(3000, seed=3)
    np.savez(tmp_path / "emb.npz", image=rows)
    res = run(
        "--sizes", "2500", "--queries", "40", "--adds", "10", "--data", f"npz:{tmp_path / 'emb.npz'}:image"
    )
    row = res["results"]["2500x48"]
    assert row["n"] == 2500 and row["dim"] == 48
    assert row["ann"]["recall_at_k"] >= 0.9
    # a size above what the file holds is refused, not silently shrunk
    with pytest.raises(subprocess.CalledProcessError) as err:
        run(
            "--sizes",
            "2990",
            "--queries",
            "40",
            "--adds",
            "10",
            "--data",
            f"npz:{tmp_path / 'emb.npz'}:image",
        )
    assert "pool rows" in err.value.stderr


def test_structure_separates_easy_from_hard_data() -> None:
    """Low-rank clusters have a lower intrinsic dimension than isotropic ones, and uniform noise has
    almost no contrast: the numbers the benchmark prints to say how hard its data is."""
    rng = np.random.default_rng(0)
    q_idx = np.arange(50)
    stats = {}
    for name, x in {
        "lowrank": LowRankMixture(256, clusters=20).draw(4000, 1),
        "isotropic": Mixture(256, clusters=20).draw(4000, 1),
        "uniform": rng.standard_normal((4000, 256)).astype(np.float32),
    }.items():
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        _, stats[name] = exact_truth_and_structure(x[50:], x[q_idx], 8)
    assert stats["lowrank"]["lid_mle20"] < stats["isotropic"]["lid_mle20"]
    contrast = {name: s["relative_contrast_at_8"] for name, s in stats.items()}
    assert contrast["uniform"] < 1.2 < contrast["isotropic"] < contrast["lowrank"], contrast
