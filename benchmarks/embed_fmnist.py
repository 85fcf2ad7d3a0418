"""Real pool embeddings of Fashion-MNIST for ``bench_pool_search.py --data npz:PATH:KEY``.

Usage: ``nice -n 19 .venv/bin/python benchmarks/embed_fmnist.py --n 20000 --out fmnist_emb.npz``.

Writes the two spaces the offline default pools per demo image: ``image`` (EfficientNet-Lite0
features, 1280-d) and ``image_text`` (ConSE over MiniLM, 384-d), plus ``label``, for ``--n`` images of
the chosen split in a seeded random order. About 25 images/s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from icdistill.data.fashion_mnist import load_fashion_mnist
    from icdistill.embed import ConSEEmbedder

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    ds = load_fashion_mnist(args.split)
    n = min(args.n, len(ds))
    order = np.random.default_rng(args.seed).permutation(len(ds))[:n]
    emb = ConSEEmbedder()
    image, conse, label = [], [], []
    t0 = time.perf_counter()
    for lo in range(0, n, 256):
        items = [ds.item(int(i)) for i in order[lo : lo + 256]]
        for q, tags in zip(items, emb.tagger.tag_many([q.image for q in items]), strict=True):
            f = np.asarray(tags.features, dtype=np.float32)
            image.append(f / np.linalg.norm(f))
            conse.append(emb.conse(tags.ids, tags.probs))
            label.append(q.label or "")
        print(f"{lo + len(items)}/{n} images, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    np.savez(args.out, image=np.stack(image), image_text=np.stack(conse), label=np.asarray(label))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
