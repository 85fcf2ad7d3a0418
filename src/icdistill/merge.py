"""``icd merge``: one result for a stream answered in shards (``icd run --shard K/N``, ``icd run --ray``).

Reads the shards' run folders (``config.json`` and ``log.jsonl``: nothing from the pool), maps each
shard's log positions back to positions of the whole stream (``icdistill.shard.whole_positions``) and
writes, for the whole stream, ``summary.json`` (the fields of a run's summary, computed over every
shard's log, plus ``shards``: which were merged, missing or unfinished), ``per_label.csv`` and
``run.png``. Shards that disagree on the stream (dataset, ``--n``, ``--seed``, N) are refused; a
missing or unfinished shard is merged as far as it goes and named (``MergeResult.problems``).
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from icdistill.data.stream import load_dataset, stream_order
from icdistill.errors import ICDError
from icdistill.run_metrics import summarize
from icdistill.run_summary import plot_run, summary_details
from icdistill.runlog import read_records, write_json_atomic
from icdistill.runner import RunConfig, stored_config
from icdistill.shard import Shard, whole_positions

# the settings every shard of one stream must share (the stream itself, and what its answers mean)
_SAME = ("dataset", "split", "n", "seed", "shuffle", "pool")
_LOGGED = ("query", "bad_input")  # the events that take a stream position


@dataclass
class MergeResult:
    summary: dict[str, Any]
    missing: list[str] = field(default_factory=list)  # shards no folder holds, "2/4"
    unfinished: dict[str, tuple[int, int]] = field(default_factory=dict)  # shard -> (done, length)
    failed: dict[str, str] = field(default_factory=dict)  # shard -> error (set by ``icd run --ray``)
    out: Path = Path()  # where the merged files went

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unfinished

    def problems(self) -> list[str]:
        out = [f"shard {s} is missing" for s in self.missing]
        for s, (done, length) in self.unfinished.items():
            why = f": {self.failed[s]}" if s in self.failed else ""
            out.append(f"shard {s} is unfinished ({done} of {length} positions){why}")
        return out


def _shard_config(folder: Path) -> RunConfig:
    cfg = stored_config(folder)
    if cfg.shard is None:
        raise ICDError(f"{folder} is not a shard (its config.json has no --shard): nothing to merge")
    return cfg


def merge_shards(folders: list[str | Path], out: str | Path | None = None) -> MergeResult:
    """Merge the shard run ``folders`` of one stream into ``out`` (default: their common parent)."""
    if not folders:
        raise ICDError("icd merge needs the shards' run folders, e.g. icd merge runs/big/shard-*")
    paths = [Path(f) for f in folders]
    for p in paths:
        if not p.is_dir():
            raise ICDError(f"{p} is not a folder")
    configs = {p: _shard_config(p) for p in paths}
    base = next(iter(configs.values()))
    for p, cfg in configs.items():
        differ = [k for k in _SAME if getattr(cfg, k) != getattr(base, k)]
        if differ:
            what = "; ".join(f"--{k} {getattr(cfg, k)} vs {getattr(base, k)}" for k in differ)
            raise ICDError(f"{p} is a shard of another stream than {paths[0]} ({what})")
    shards: dict[Shard, Path] = {}
    for p, cfg in configs.items():
        shard = Shard.parse(cfg.shard or "")
        if shard.count != Shard.parse(base.shard or "").count:
            raise ICDError(f"{p} is shard {shard} but {paths[0]} is shard {base.shard}: split differently")
        if shard in shards:
            raise ICDError(f"{p} and {shards[shard]} are both shard {shard}")
        shards[shard] = p
    count = next(iter(shards)).count
    dataset = load_dataset(base.dataset, split=base.split)
    order = stream_order(len(dataset), base.n, base.seed, base.shuffle)
    result = MergeResult(summary={})
    merged: list[dict[str, Any]] = []
    for index in range(1, count + 1):
        shard = Shard(index, count)
        if shard not in shards:
            result.missing.append(str(shard))
            continue
        where = whole_positions(dataset, order, shard)
        log = shards[shard] / "log.jsonl"
        done: set[int] = set()
        for rec in read_records(log) if log.exists() else []:
            if rec.get("event") not in _LOGGED:
                continue
            local = int(rec["position"])
            if local >= len(where):
                raise ICDError(f"{log}: position {local} is past the shard's {len(where)} (another stream?)")
            done.add(local)
            merged.append({**rec, "position": where[local], "shard": str(shard), "shard_position": local})
        if len(done) < len(where):
            result.unfinished[str(shard)] = (len(done), len(where))
    merged.sort(key=lambda r: r["position"])
    result.summary = _summary(merged, base, dataset.name, len(dataset), len(order), shards, result)
    target = Path(out) if out is not None else Path(os.path.commonpath([p.resolve() for p in paths]))
    if len(paths) == 1 and out is None:
        target = paths[0].resolve().parent
    target.mkdir(parents=True, exist_ok=True)
    result.out = target
    write_json_atomic(target / "summary.json", result.summary)
    write_per_label(result.summary, target / "per_label.csv")
    plot_run(merged, target / "run.png")
    return result


def _summary(
    merged: list[dict[str, Any]],
    base: RunConfig,
    name: str,
    size: int,
    length: int,
    shards: dict[Shard, Path],
    result: MergeResult,
) -> dict[str, Any]:
    summary = summarize(merged)
    summary.update(summary_details(merged))
    queries = [r for r in merged if r.get("event") == "query"]
    # the shared pool as the last query of any shard saw it (records are in stream order, not time)
    summary["pool_size"] = max((r["pool_size"] for r in queries), default=0)
    summary["pool_location"] = base.pool
    summary["unlabelled_queries"] = sum(r.get("label") is None for r in queries)
    summary["dataset"] = {"name": name, "size": size, "stream_length": length}
    summary["shards"] = {
        "count": next(iter(shards)).count if shards else 0,
        "merged": {str(s): str(p) for s, p in sorted(shards.items(), key=lambda kv: kv[0].index)},
        "missing": result.missing,
        "unfinished": {s: {"done": d, "length": n} for s, (d, n) in result.unfinished.items()},
        "complete": result.complete,
    }
    summary["config"] = asdict(replace(base, shard=None))
    return summary


def write_per_label(summary: dict[str, Any], path: Path) -> None:
    """The per-label table of a summary as CSV (label, n, accuracies, teacher calls)."""
    cols = ["n", "accuracy", "first_pass_accuracy", "student_only_accuracy", "teacher_calls"]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["label", *cols])
        for label, row in (summary.get("per_label") or {}).items():
            w.writerow([label, *(row.get(c) for c in cols)])
    os.replace(tmp, path)
