"""What the offline student reads from its demos, on a fixed teacher-labelled pool (no gate, no stream).

A pool of ``--pool`` Fashion-MNIST test images with their true labels (the size of an ICD pool at a 5%
budget on 500 queries) and ``--queries`` other images; each query gets its ``--shots`` most similar
demos (EfficientNet features, best last). The LM scores every option once per query; everything else
is computed from those scores, so all rows compare the same forward passes:

- the LM alone, raw and calibrated online (``OnlineCalibration``),
- a similarity-weighted vote of the same demos (1-NN and k-NN: what ``knn-pool`` does),
- the product of experts the student uses (``mix``), and the LM's label histogram.

Usage: ``.venv/bin/python benchmarks/bench_student.py --pool 25 --queries 150 --shots 2 --seed 0``.
Prints a JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np

from icdistill.data.fashion_mnist import load_fashion_mnist
from icdistill.models.efficientnet import ImageTagger
from icdistill.models.scoring import score_continuations
from icdistill.models.smollm2 import OnlineCalibration, SmolLM2Student, build_prompt, option_continuation


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", type=int, default=25)
    ap.add_argument("--queries", type=int, default=150)
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.05)
    args = ap.parse_args()

    ds = load_fashion_mnist("test")
    idx = np.random.default_rng(args.seed).permutation(len(ds))[: args.pool + args.queries]
    items = [ds.item(int(i)) for i in idx]
    tagger = ImageTagger()
    tags = tagger.tag_many([q.image for q in items])
    feats = np.stack([t.features / np.linalg.norm(t.features) for t in tags])
    options = list(items[0].options or ())
    model, tokenizer = SmolLM2Student(tagger).lm()
    pool = list(range(args.pool))
    y, lm, votes, nearest = [], [], [], []
    t0 = time.perf_counter()
    for qi in range(args.pool, len(items)):
        q = items[qi]
        sims = feats[pool] @ feats[qi]
        best = np.argsort(-sims, kind="stable")[: args.shots]
        shots = [(tags[pool[j]].describe(5), q.prompt, items[pool[j]].label or "") for j in best[::-1]]
        prompt = build_prompt(tags[qi].describe(5), q.prompt, shots, q.options)
        lm.append(score_continuations(model, tokenizer, prompt, [option_continuation(o) for o in options]))
        w = np.exp((sims[best] - sims[best].max()) / args.temperature)
        vote = np.full(len(options), 1e-6)
        for j, wj in zip(best, w / w.sum(), strict=True):
            vote[options.index(items[pool[j]].label)] += wj
        votes.append(vote)
        nearest.append(options.index(items[pool[best[0]]].label))
        y.append(options.index(q.label))
    seconds = (time.perf_counter() - t0) / args.queries
    y_arr, logp = np.array(y), _log_softmax(np.array(lm))
    cal = OnlineCalibration()
    calibrated = _log_softmax(np.stack([cal(options, True, row) for row in logp]))
    log_vote = np.log(np.array(votes))

    def acc(scores: np.ndarray) -> float:
        return float((scores.argmax(1) == y_arr).mean())

    result = {
        "pool": args.pool,
        "queries": args.queries,
        "shots": args.shots,
        "seed": args.seed,
        "lm_seconds_per_query": seconds,
        "accuracy": {
            "lm": acc(logp),
            "lm_calibrated": acc(calibrated),
            "nearest_demo (1-NN)": float((np.array(nearest) == y_arr).mean()),
            f"vote of the {args.shots} demos": acc(log_vote),
            **{
                f"mix={m} (calibrated LM x vote)": acc((1 - m) * calibrated + m * log_vote)
                for m in (0.3, 0.5, 0.7)
            },
        },
        "lm_answers": dict(Counter(options[i] for i in logp.argmax(1))),
        "true_labels": dict(Counter(options[i] for i in y_arr)),
        "lm_agrees_with_nearest": float((logp.argmax(1) == np.array(nearest)).mean()),
    }
    for name, value in result["accuracy"].items():
        print(f"{name:38s} {value:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
