"""Selectors on the pool's index: same choices as an exact scan, and no full scans per query."""

import numpy as np
import pytest

from icdistill.pool import IndexConfig, SQLitePool
from icdistill.select import SELECTORS, make_selector
from icdistill.types import ANSWER, IMAGE, IMAGE_TEXT, TEXT, Annotation, Query


def ann(a: str) -> Annotation:
    return Annotation(answer=a, samples=[a], votes={a: 1}, agreement=1.0, accepted=True, teacher="t")


class ScanOnly:
    """The bare Pool protocol (no search, no kind_ids): selectors fall back to exact scans."""

    def __init__(self, pool):
        self._pool = pool

    def __len__(self):
        return len(self._pool)

    def demos(self):
        return self._pool.demos()

    def vectors(self, key):
        return self._pool.vectors(key)

    def get(self, demo_id):
        return self._pool.get(demo_id)


class NoScans:
    """A pool whose full-scan methods fail: selection must go through search and kind_ids."""

    def __init__(self, pool):
        self._pool = pool

    def __len__(self):
        return len(self._pool)

    def demos(self):
        raise AssertionError("demos() scanned the whole pool")

    def vectors(self, key):
        raise AssertionError("vectors() scanned the whole pool")

    def get(self, demo_id):
        return self._pool.get(demo_id)

    def search(self, *a, **kw):
        return self._pool.search(*a, **kw)

    def kind_ids(self, options):
        return self._pool.kind_ids(options)


def random_pool(rng, cfg: IndexConfig) -> SQLitePool:
    """Few distinct prompts and answers (ties everywhere, as in classification), some missing keys,
    several kinds of question."""
    pool = SQLitePool(None, index=cfg)
    prompts = [rng.standard_normal(4) for _ in range(int(rng.integers(1, 4)))]
    answers = [rng.standard_normal(4) for _ in range(int(rng.integers(1, 6)))]
    images = [rng.standard_normal(6) for _ in range(int(rng.integers(5, 60)))]
    for i in range(int(rng.integers(1, 250))):
        opts = ("a", "b") if rng.random() < 0.8 else (None if rng.random() < 0.5 else ("c",))
        emb = {}
        if rng.random() < 0.9:
            emb[TEXT] = prompts[rng.integers(len(prompts))]
        if rng.random() < 0.9:
            emb[ANSWER] = answers[rng.integers(len(answers))]
        if rng.random() < 0.9:
            noise = 0 if rng.random() < 0.5 else 0.1 * rng.standard_normal(6)
            emb[IMAGE] = images[rng.integers(len(images))] + noise
        pool.add(Query(id=f"d{i}", image=None, prompt="p", options=opts, position=i), ann(str(i % 3)), emb)
    pool.test_vocab = (prompts, images)  # type: ignore[attr-defined]
    return pool


@pytest.mark.parametrize("cfg", [IndexConfig(), IndexConfig(exact_below=0, exact_candidates=8)])
def test_index_path_chooses_what_an_exact_scan_chooses(cfg):
    rng = np.random.default_rng(1)
    compared = 0
    for _ in range(12):
        pool = random_pool(rng, cfg)
        prompts, images = pool.test_vocab
        for j in range(8):
            q = Query(id=f"q{j}", image=None, prompt="p", options=("a", "b") if rng.random() < 0.7 else None)
            e = {}
            if rng.random() < 0.8:
                e[TEXT] = prompts[rng.integers(len(prompts))]
            if rng.random() < 0.8:
                e[IMAGE_TEXT] = rng.standard_normal(4)
            if rng.random() < 0.8:
                e[IMAGE] = images[rng.integers(len(images))]
            for name in SELECTORS:
                for k in (1, 3):
                    kw = (
                        {"k_tt": int(rng.integers(1, 30)), "k_it": int(rng.integers(1, 10))}
                        if name == "cross-modal"
                        else {}
                    )
                    sel = make_selector(name, **kw)
                    want = [d.id for d in sel.select(q, e, ScanOnly(pool), k)]
                    assert [d.id for d in sel.select(q, e, pool, k)] == want, (name, k, kw)
                    compared += 1
    assert compared == 12 * 8 * len(SELECTORS) * 2


def test_selection_on_a_large_pool_does_no_full_scan():
    rng = np.random.default_rng(0)
    pool = SQLitePool(None, index=IndexConfig(exact_below=500))
    answers = rng.standard_normal((10, 8))
    text = rng.standard_normal(8)
    centres = rng.standard_normal((50, 16))
    for i in range(3000):
        c = i % 50
        emb = {TEXT: text, ANSWER: answers[c % 10], IMAGE: centres[c] + 0.1 * rng.standard_normal(16)}
        pool.add(
            Query(id=f"d{i}", image=None, prompt="p", options=("a", "b"), position=i), ann(str(c % 10)), emb
        )
    guarded = NoScans(pool)
    q = Query(id="q", image=None, prompt="p", options=("a", "b"))
    e = {TEXT: text, IMAGE_TEXT: answers[3], IMAGE: centres[13]}
    for name in ("image", "text", "image-text", "cross-modal"):
        got = make_selector(name).select(q, e, guarded, 4)
        assert len(got) == 4
    # one prompt for all, so the text stage keeps everyone; the answer stage keeps class 3 (ties),
    # and the image stage finds the nearest images among them: cluster 13
    got = make_selector("cross-modal", k_tt=8, k_it=4).select(q, e, guarded, 4)
    assert all(d.answer == "3" for d in got)
    assert {int(d.query_id[1:]) % 50 for d in got} == {13}
