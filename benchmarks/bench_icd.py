"""Accuracy vs teacher-call rate of the offline default on Fashion-MNIST, against baselines in the same run.

Usage: ``.venv/bin/python benchmarks/bench_icd.py [suite ...] [--n 200] [--seeds 0,1,2]``.
Suites: ``budget`` (zero-shot vs ICD at several budgets), ``selectors`` (demo selection at one budget),
``shots`` (1, 2, 4 demonstrations),
``ablations`` (forward the teacher, random gate, demo order), ``noise`` (noisy teacher, voting, agreement floor).
Each suite writes ``benchmarks/results/<suite>.json`` (medians over seeds with min-max) and a plot.
Seeds change the stream order (and the noise draws), so the spread covers both.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from icdistill.eval.sweep import Arm, markdown_table, plot_tradeoff, run_sweep, save_results  # noqa: E402
from icdistill.models.registry import ModelContext  # noqa: E402
from icdistill.runner import RunConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"

SUITES: dict[str, tuple[list[Arm], str]] = {
    "budget": (
        [
            Arm("zero-shot (gate never)", {"gate": "never"}),
            Arm("ICD budget 5%", {"budget": 0.05}),
            Arm("ICD budget 10%", {"budget": 0.10}),
            Arm("ICD budget 20%", {"budget": 0.20}),
        ],
        "zero-shot (gate never)",
    ),
    "selectors": (
        [
            Arm("random demos", {"selector": "random", "budget": 0.10}),
            Arm("image-image", {"selector": "image", "budget": 0.10}),
            Arm("image-answer text (ConSE)", {"selector": "image-text", "budget": 0.10}),
            Arm("cross-modal staged", {"selector": "cross-modal", "budget": 0.10}),
        ],
        "random demos",
    ),
    "ablations": (
        [
            Arm("re-run student (default)", {"answer": "student", "budget": 0.10}),
            Arm("forward teacher answer", {"answer": "forward", "budget": 0.10}),
            Arm("random gate at same rate", {"gate": "random", "budget": 0.10}),
            Arm("best demo first in prompt", {"demo_order": "best-first", "budget": 0.10}),
        ],
        "re-run student (default)",
    ),
    "shots": (
        [
            Arm("image-image, 1 shot", {"selector": "image", "shots": 1, "budget": 0.10}),
            Arm("image-image, 2 shots", {"selector": "image", "shots": 2, "budget": 0.10}),
            Arm("image-image, 4 shots", {"selector": "image", "shots": 4, "budget": 0.10}),
        ],
        "image-image, 2 shots",
    ),
    "noise": (
        [
            Arm("noise 0.3, 1 sample", {"teacher": "reference:noise=0.3", "budget": 0.10}),
            Arm(
                "noise 0.3, 5 samples vote", {"teacher": "reference:noise=0.3", "samples": 5, "budget": 0.10}
            ),
            Arm(
                "noise 0.3, 5 samples, agreement>=0.6",
                {"teacher": "reference:noise=0.3", "samples": 5, "agreement": 0.6, "budget": 0.10},
            ),
        ],
        "noise 0.3, 1 sample",
    ),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", default=list(SUITES))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    base = RunConfig(n=args.n)
    ctx = ModelContext()  # one set of loaded models for every run
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suite in args.suites:
        if suite not in SUITES:
            print(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}", file=sys.stderr)
            return 2
        arms, baseline = SUITES[suite]
        t0 = time.time()

        def progress(arm: str, seed: int, s: dict, suite: str = suite) -> None:
            print(
                f"[{suite}] {arm} seed={seed}: acc={s['accuracy']:.3f} rate={s['teacher_call_rate']:.3f} "
                f"demo_acc={s['demonstration_accuracy']} s/q={s['seconds_per_query']:.2f}",
                flush=True,
            )

        results = run_sweep(base, arms, seeds, ctx=ctx, on_run=progress)
        results["suite"] = suite
        results["wall_seconds"] = time.time() - t0
        save_results(results, RESULTS / f"{suite}.json")
        table = markdown_table(results, baseline=baseline)
        (RESULTS / f"{suite}.md").write_text(table + "\n")
        plot_tradeoff(
            results, RESULTS / f"{suite}.png", title=f"Fashion-MNIST, n={args.n}, seeds {args.seeds}: {suite}"
        )
        print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
