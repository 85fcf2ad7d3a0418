import numpy as np
import pytest

from fakes import FakeEmbedder
from icdistill.conformance import check_selector
from icdistill.errors import ICDError
from icdistill.pool import SQLitePool
from icdistill.select import CrossModalSelector, RandomSelector, SimilaritySelector, make_selector
from icdistill.types import ANSWER, IMAGE, IMAGE_TEXT, TEXT, Annotation, Query


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


def test_near_identical_vectors_tie_older_first():
    # the older demo scores 1 - 1.2e-7 against the query, the newer exactly 1:
    # a BLAS-level difference must not beat the documented "older first"
    p = SQLitePool(None)
    p.add(Query(id="old", image=None, prompt="p", position=0), ann("a"), {IMAGE: unit(1, 5e-4)})
    p.add(Query(id="new", image=None, prompt="p", position=1), ann("b"), {IMAGE: unit(1, 0)})
    got = SimilaritySelector(IMAGE, IMAGE).select(Q, {IMAGE: unit(1, 0)}, p, 2)
    assert [d.query_id for d in got] == ["old", "new"]


def test_cross_modal_backfills_demos_missing_the_last_key():
    # stage 2 keeps d0..d3; only d0 has an image vector: the image stage alone would return 1 of k=3
    p = SQLitePool(None)
    for i in range(6):
        emb = {TEXT: unit(1, 0), ANSWER: unit(1, 0.1 * i, 0)}
        if i == 0:
            emb[IMAGE] = unit(1, 0, 0)
        p.add(Query(id=f"d{i}", image=None, prompt="cat?", position=i), ann("x"), emb)
    got = CrossModalSelector(k_tt=6, k_it=4).select(Q, query_emb(), p, 3)
    assert len(got) == 3 and got[0].query_id == "d0"
    assert [d.query_id for d in got[1:]] == ["d1", "d2"]  # in the answer stage's order


def test_similarity_selector_backfills_demos_without_the_key():
    p = SQLitePool(None)
    p.add(Query(id="a", image=None, prompt="p", position=0), ann("x"), {TEXT: unit(1, 0)})
    p.add(Query(id="b", image=None, prompt="p", position=1), ann("y"), {IMAGE: unit(1, 0)})
    got = SimilaritySelector(IMAGE, IMAGE).select(Q, {IMAGE: unit(1, 0)}, p, 2)
    assert [d.query_id for d in got] == ["b", "a"]


def test_cross_modal_random_fallback_follows_seed():
    p = SQLitePool(None)
    for i in range(30):
        p.add(Query(id=f"d{i}", image=None, prompt="p", position=i), ann("x"), {TEXT: unit(1, i)})
    picks = {
        seed: [d.id for d in make_selector("cross-modal", seed=seed).select(Q, {}, p, 3)] for seed in range(4)
    }
    assert len({tuple(v) for v in picks.values()}) > 1
    assert picks[2] == [d.id for d in RandomSelector(seed=2).select(Q, {}, p, 3)]


def test_demos_answer_the_same_kind_of_question(tmp_path):
    p = SQLitePool(tmp_path / "pool.sqlite")
    colour = ("red", "green")
    p.add(
        Query(id="open", image=None, prompt="Describe it.", position=0), ann("a red box"), {IMAGE: unit(1, 0)}
    )
    p.add(
        Query(id="opt", image=None, prompt="Which colour?", options=colour, position=1),
        ann("red"),
        {IMAGE: unit(0.5, 0.5)},
    )
    q_opt = Query(id="q", image=None, prompt="Which colour?", options=colour, position=2)
    q_open = Query(id="q2", image=None, prompt="Describe it.", position=3)
    for name in ("random", "image", "cross-modal"):
        sel = make_selector(name)
        assert [d.query_id for d in sel.select(q_opt, {IMAGE: unit(1, 0)}, p, 2)] == ["opt"]
        assert [d.query_id for d in sel.select(q_open, {IMAGE: unit(1, 0)}, p, 2)] == ["open"]
    mixed = make_selector("image", mix_questions=True).select(q_opt, {IMAGE: unit(1, 0)}, p, 2)
    assert [d.query_id for d in mixed] == ["open", "opt"]
    p.close()
    with SQLitePool(tmp_path / "pool.sqlite") as reopened:  # demos read back still know their options
        assert [
            d.query_id for d in make_selector("image").select(q_opt, {IMAGE: unit(1, 0)}, reopened, 2)
        ] == ["opt"]
