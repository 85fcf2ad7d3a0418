"""How well each gate score detects the student's first-pass errors, from an eval's cell logs.

For every cell of ``icd eval --out DIR`` (its ``cells/*/*/seed-*/log.jsonl``), the AUROC for first-pass
errors of: the student's uncertainty (option entropy), and the budget gate's scores recomputed from
the signals each log line records (``gate_signals``: nearest same-kind demo similarity, typicality):
``coverage`` (novelty x typicality) and ``coverage-uncertainty``. Warm-up queries (an empty pool of
the query's kind) are left out: every score says "ask" there.

    python benchmarks/gate_auroc.py runs/eval-fmnist-500 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from icdistill.eval.scores import auroc
from icdistill.gate import GATE_SCORES, gate_score
from icdistill.runlog import read_records
from icdistill.types import GateContext


def cell_aurocs(records: list[dict[str, Any]]) -> dict[str, float | None]:
    rows = [
        r
        for r in records
        if r.get("event") == "query" and r.get("label") is not None and r.get("ctx_pool_size", 0) > 0
    ]
    wrong = [not r["first_correct"] for r in rows]
    out: dict[str, float | None] = {"n": float(len(rows))}
    for name in GATE_SCORES:
        scores = [
            gate_score(name, r["uncertainty"], GateContext(r["position"], 0, r["ctx_pool_size"], signals=r.get("gate_signals") or {}))
            for r in rows
        ]
        distinct = len(set(scores)) > 1 and len(set(wrong)) > 1
        out[name] = auroc(scores, wrong) if distinct else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dir", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cells: dict[str, dict[str, dict[str, float | None]]] = {}
    for log in sorted(args.eval_dir.glob("cells/*/*/seed-*/log.jsonl")):
        method = log.parent.parent.parent.name
        if method in ("student-zero-shot", "teacher-zero-shot"):
            continue
        cells.setdefault(method, {})[log.parent.name] = cell_aurocs(read_records(log))
    summary = {}
    for method, seeds in cells.items():
        summary[method] = {
            name: statistics.median(v[name] for v in seeds.values() if v[name] is not None)
            if any(v[name] is not None for v in seeds.values())
            else None
            for name in GATE_SCORES
        }
        print(method, {k: None if v is None else round(v, 3) for k, v in summary[method].items()})
    if args.json:
        args.json.write_text(json.dumps({"median": summary, "cells": cells}, indent=1))


if __name__ == "__main__":
    main()
