"""Replays the judge over the logs of ``icd:judge=full`` eval cells (every expert read on every query)
with other settings, without any model: what each setting of the judge would have answered on the
same stream, pool and teacher calls (the coverage gate's calls do not depend on the answers).

    python benchmarks/judge_replay.py runs/b24-photos runs/b24-fmnist --bandwidth 0.05,0.1,0.2 --prior 0.5,1,4 --reweight 1,0 --likelihood 1,0

Prints, per eval folder and setting, the judged first-pass accuracy over the seeds' full cells, beside
the best single expert and the envelope (the share of queries any expert gets right). The likelihood
ratio (``--likelihood 1``) needs each query's image features, which the log does not keep: the eval's
dataset is opened and its images embedded again with the eval's embedder (``eval.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import numpy as np

from icdistill.data.stream import load_dataset
from icdistill.judge import ICL, VOTE, ZERO_SHOT, Judge, JudgeConfig
from icdistill.judge_checks import _bayes, _even, _mix
from icdistill.mixture import temper
from icdistill.models.registry import resolve_embedder
from icdistill.types import IMAGE


def _records(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()]


def _features(folder: Path, records: list[list[dict]]) -> dict[str, np.ndarray]:
    """The image features of every query of ``records``, embedded again as the eval embedded them."""
    base = json.loads((folder / "eval.json").read_text())["base"]
    dataset = load_dataset(base["dataset"], split=base["split"])
    need = {r["query_id"] for rs in records for r in rs if r.get("event") == "query"}
    queries = [q for q in (dataset.item(i) for i in range(len(dataset))) if q.id in need]
    embedder = resolve_embedder(base["embedder"])
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(queries), 32):
        batch = queries[start : start + 32]
        for q, emb in zip(batch, embedder.embed_queries(batch), strict=True):
            if IMAGE in emb:
                out[q.id] = np.asarray(emb[IMAGE], dtype=np.float32)
    return out


def replay(
    records: list[dict],
    config: JudgeConfig,
    select: bool = False,
    features: dict[str, np.ndarray] | None = None,
) -> tuple[int, int, dict[str, int], int]:
    """(right, judged, right per expert, any expert right) over the judged first passes. ``select``: the
    expert right most often near the query's similarity answers (a learned switch), not a combination.
    ``features``: the queries' image features, for the likelihood ratio (``config.likelihood``)."""
    judge = Judge(student=None, shots=2, config=config)  # type: ignore[arg-type]  # never asked: all is logged
    right = judged = envelope = 0
    per = dict.fromkeys((ICL, ZERO_SHOT, VOTE), 0)
    for r in records:
        if r.get("event") != "query":
            continue
        j = ((r.get("student_details") or {}).get("judge")) or {}
        if j.get("by") == "judge" and j.get("icl") and j.get("zero_shot") and r.get("label") is not None:
            options = list((r.get("option_probs") or {}).keys())
            w, t_icl, t_zs = judge.checks.weights(tuple(options), j["similarity"])
            readings = {
                ICL: temper(np.asarray(j["icl"]), t_icl),
                ZERO_SHOT: temper(np.asarray(j["zero_shot"]), t_zs),
                VOTE: np.asarray(j["vote"]) if j.get("vote") else None,
            }
            p = _mix({k: v if v is not None or k == VOTE else _even(options) for k, v in readings.items()}, w)
            if config.rule == "bayes":
                p = _bayes(readings, judge.checks.reliabilities(tuple(options), j["similarity"]), p)
            if config.likelihood and features is not None and r["query_id"] in features:
                p = p * judge._ratios(tuple(options), {IMAGE: features[r["query_id"]]})
            if select:  # the expert most often right near s answers
                rel = judge.checks.reliabilities(tuple(options), j["similarity"])
                names = [k for k in (ICL, ZERO_SHOT, VOTE) if readings[k] is not None]
                best = max(names, key=lambda k: rel[(ICL, ZERO_SHOT, VOTE).index(k)])
                p = readings[best] + 1e-6 * p
            label = r["label"]
            judged += 1
            right += int(options[int(np.argmax(p))] == label)
            hits = [options[int(np.argmax(v))] == label for v in readings.values() if v is not None]
            for k, v in readings.items():
                if v is not None:
                    per[k] += int(options[int(np.argmax(v))] == label)
            envelope += int(any(hits))
        judge.replay(r)
    return right, judged, per, envelope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evals", nargs="+", type=Path)
    ap.add_argument("--bandwidth", default="0.2")
    ap.add_argument("--prior", default="1")
    ap.add_argument("--local-temperature", default="0", help="1, 0 or 1,0 (both)")
    ap.add_argument("--estimate", default="mean", help="mean, map or mean,map")
    ap.add_argument(
        "--reweight", default="1", help="1, 0 or 1,0: the checks weighed to the pooled/unpooled mix"
    )
    ap.add_argument(
        "--rule", default="bayes,mixture", help="bayes, mixture, select (a learned switch), comma-separated"
    )
    ap.add_argument(
        "--likelihood", default="1", help="1, 0 or 1,0: the answer times the labels' likelihood ratios"
    )
    ap.add_argument("--likelihood-bandwidth", default="0.1")
    ap.add_argument("--likelihood-prior", default="30")
    args = ap.parse_args()
    grid = list(
        itertools.product(
            map(float, args.bandwidth.split(",")),
            map(float, args.prior.split(",")),
            [x == "1" for x in args.local_temperature.split(",")],
            args.estimate.split(","),
            args.rule.split(","),
            [x == "1" for x in args.reweight.split(",")],
            [x == "1" for x in args.likelihood.split(",")],
            map(float, args.likelihood_bandwidth.split(",")),
            map(float, args.likelihood_prior.split(",")),
        )
    )
    for folder in args.evals:
        logs = sorted(folder.glob("cells/icd__judge=full/*/seed-*/log.jsonl"))
        if not logs:
            print(f"{folder}: no icd:judge=full cell")
            continue
        recs = [_records(p) for p in logs]
        features = _features(folder, recs) if any(g[6] for g in grid) else None
        for bw, prior, local, est, rule, reweight, likelihood, lik_bw, lik_prior in grid:
            accs, bests, envs = [], [], []
            for rs in recs:
                config = JudgeConfig(
                    bandwidth=bw,
                    prior=prior,
                    local_temperature=local,
                    estimate=est,
                    rule="mixture" if rule == "select" else rule,
                    reweight=reweight,
                    likelihood=likelihood,
                    likelihood_bandwidth=lik_bw,
                    likelihood_prior=lik_prior,
                )
                right, n, per, env = replay(rs, config, select=rule == "select", features=features)
                accs.append(right / n)
                bests.append(max(per.values()) / n)
                envs.append(env / n)
            print(
                f"{folder.name} {rule} bandwidth {bw:g} prior {prior:g} local T {int(local)} {est} reweight {int(reweight)} "
                f"likelihood {int(likelihood)} ({lik_bw:g}, {lik_prior:g}): judged {statistics.median(accs):.3f} "
                f"{[round(a, 3) for a in accs]}  best expert {statistics.median(bests):.3f}  "
                f"envelope {statistics.median(envs):.3f}"
            )


if __name__ == "__main__":
    main()
