"""A pool holds each vector once, in its index: demos read theirs from it (a 1M x 1280 pool whose
vectors were held three to four times did not open in 24 GB; BENCHMARKS.md section 7)."""

import numpy as np
import pytest

from icdistill.index import unit_rows
from icdistill.pool import IndexedEmbeddings, SQLitePool
from icdistill.types import ANSWER, IMAGE
from test_pool import ann, emb, make_query


def test_demos_read_their_vectors_from_the_index_after_add_and_reopen(tmp_path):
    path = tmp_path / "pool.sqlite"
    with SQLitePool(path) as pool:
        for i in range(6):
            demo, status = pool.add(make_query(i), ann(), emb(i))
            assert status == "added" and isinstance(demo.embeddings, IndexedEmbeddings)
    with SQLitePool(path) as pool:
        for demo in pool.demos():
            assert isinstance(demo.embeddings, IndexedEmbeddings)
            assert sorted(demo.embeddings) == sorted([ANSWER, IMAGE]) and len(demo.embeddings) == 2
            i = int(demo.query_id[1:])
            for key, raw in emb(i).items():
                np.testing.assert_allclose(demo.embeddings[key], raw / np.linalg.norm(raw), rtol=1e-6)
            with pytest.raises(KeyError):
                demo.embeddings["no such key"]


def test_an_evicted_demo_has_no_vectors_left(tmp_path):
    with SQLitePool(tmp_path / "pool.sqlite", max_size=2) as pool:
        first, _ = pool.add(make_query(0), ann(), emb(0))
        for i in range(1, 3):
            pool.add(make_query(i), ann(), emb(i))
        assert first.id not in {d.id for d in pool.demos()}
        assert len(first.embeddings) == 0 and IMAGE not in first.embeddings


def test_unit_rows_does_not_copy_rows_that_are_already_unit():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out = unit_rows(x)
    assert np.shares_memory(out, x) and not out.flags.writeable
    np.testing.assert_array_equal(out, x)
    y = x.copy()
    y[3] *= 2.0  # one row off unit: a normalised copy, the input untouched
    out = unit_rows(y)
    assert not np.shares_memory(out, y) and out.flags.writeable
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(out[0], x[0])  # unit rows stay bit-identical
    assert np.linalg.norm(y[3]) == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_array_equal(unit_rows(np.zeros((2, 3))), np.zeros((2, 3)))
