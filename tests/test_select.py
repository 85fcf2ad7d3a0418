import numpy as np
import pytest

from fakes import FakeEmbedder
from icdistill.conformance import check_selector
from icdistill.pool import SQLitePool
from icdistill.select import CrossModalSelector, RandomSelector, SimilaritySelector, make_selector
from icdistill.types import ANSWER, IMAGE, IMAGE_TEXT, TEXT, Annotation, ICDError, Query


def unit(*xs):
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def ann(answer):
    return Annotation(
        answer=answer, samples=[answer], votes={answer: 1}, agreement=1.0, accepted=True, teacher="t"
    )


@pytest.fixture()
def pool():
    """Six demos with hand-made embeddings: (image dir, text dir, answer dir)."""
    p = SQLitePool(None)
    specs = [
        # id: prompt-vec, answer-vec, image-vec
        ("cat?", unit(1, 0), unit(1, 0, 0), unit(1, 0, 0), "cat"),
        ("cat?", unit(1, 0), unit(0, 1, 0), unit(0.9, 0.1, 0), "dog"),
        ("cat?", unit(1, 0), unit(1, 0, 0), unit(0.5, 0.5, 0), "cat"),
        ("car?", unit(0, 1), unit(1, 0, 0), unit(1, 0, 0), "cat"),
        ("car?", unit(0, 1), unit(0, 0, 1), unit(0, 0, 1), "car"),
        ("car?", unit(0.1, 1), unit(0, 0, 1), unit(0, 1, 0), "car"),
    ]
    for i, (prompt, t, a, im, answer) in enumerate(specs):
        q = Query(id=f"d{i}", image=None, prompt=prompt, position=i)
        p.add(q, ann(answer), {TEXT: t, ANSWER: a, IMAGE: im})
    return p


def query_emb():
    return {TEXT: unit(1, 0), IMAGE_TEXT: unit(1, 0, 0), IMAGE: unit(1, 0, 0)}


Q = Query(id="q", image=None, prompt="cat?", position=99)


def test_image_selector_top_k(pool):
    got = SimilaritySelector(IMAGE, IMAGE).select(Q, query_emb(), pool, 2)
    assert [d.query_id for d in got] == ["d0", "d3"]  # exact image matches, older first on ties


def test_cross_modal_staged(pool):
    # stage tt keeps the "cat?" prompts (d0-d2); stage it keeps answers near "cat" (d0, d2);
    # stage ii orders by image: d0 then d2 -- d3 (same image, other prompt) is filtered out by stage tt
    sel = CrossModalSelector(k_tt=3, k_it=2)
    got = sel.select(Q, query_emb(), pool, 2)
    assert [d.query_id for d in got] == ["d0", "d2"]


def test_cross_modal_skips_missing_modality(pool):
    sel = CrossModalSelector(k_tt=3, k_it=2)
    only_image = {IMAGE: unit(0, 1, 0)}
    got = sel.select(Q, only_image, pool, 1)
    assert [d.query_id for d in got] == ["d5"]


def test_cross_modal_keeps_ties_in_filter_stages():
    # every prompt identical (a classification stream): the text stage must not cut arbitrarily
    p = SQLitePool(None)
    for i in range(10):
        im = unit(1, 0) if i == 9 else unit(0, 1)
        p.add(
            Query(id=f"d{i}", image=None, prompt="same", position=i), ann("x"), {TEXT: unit(1, 1), IMAGE: im}
        )
    got = CrossModalSelector(k_tt=2, k_it=2).select(Q, {TEXT: unit(1, 1), IMAGE: unit(1, 0)}, p, 1)
    assert got[0].query_id == "d9"


def test_random_selector_reproducible(pool):
    a = RandomSelector(seed=1).select(Q, {}, pool, 3)
    b = RandomSelector(seed=1).select(Q, {}, pool, 3)
    assert [d.id for d in a] == [d.id for d in b]


def test_empty_pool_and_unknown():
    empty = SQLitePool(None)
    for name in ("random", "image", "text", "image-text", "cross-modal"):
        assert make_selector(name).select(Q, query_emb(), empty, 3) == []
    with pytest.raises(ICDError):
        make_selector("magic")


@pytest.mark.parametrize("name", ["random", "image", "text", "image-text", "cross-modal"])
def test_conformance(name, pool):
    from icdistill.conformance import sample_queries

    qs = sample_queries()
    emb = FakeEmbedder()
    p = SQLitePool(None)
    for q in qs:
        p.add(q, ann(q.label), {**emb.embed_query(q), ANSWER: emb.embed_texts([q.label])[0]})
    check_selector(make_selector(name), p, qs, emb)
