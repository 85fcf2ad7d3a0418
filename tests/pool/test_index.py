import shutil

import numpy as np
import pytest

from icdistill.errors import ICDError
from icdistill.pool import IndexConfig, VectorIndex, unit_rows


def clustered(n: int, d: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return unit_rows(x)


def brute(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    s = x @ unit_rows(q)[0]
    order = np.lexsort((ids, -s))
    return ids[order][:k].tolist()


ANN = IndexConfig(exact_below=0, exact_candidates=0)  # always through the graph


def test_exact_mode_matches_brute_force_and_breaks_ties_by_id():
    x = clustered(300, 16, 10)
    x[200] = x[5]  # a tie: the older id must come first
    ids = np.arange(1000, 1300)
    idx = VectorIndex(16)
    idx.add(ids, x)
    assert idx.mode == "exact" and len(idx) == 300
    got, scores = idx.search(x[5], 4)
    assert got[:2].tolist() == [1005, 1200]
    assert got.tolist() == brute(x, ids, x[5], 4)
    assert np.all(np.diff(scores) <= 0)
    for q in clustered(20, 16, 10, seed=1):
        assert idx.search(q, 8)[0].tolist() == brute(x, ids, q, 8)


def test_switches_to_ann_at_the_threshold():
    x = clustered(101, 8, 5)
    idx = VectorIndex(8, IndexConfig(exact_below=100))
    idx.add(np.arange(99), x[:99])
    assert idx.mode == "exact"
    idx.add([99], x[99:100])
    assert idx.mode == "ann"
    idx.remove([0])
    assert idx.mode == "exact"


def test_ann_recall_on_clustered_data():
    x = clustered(4000, 32, 40)
    ids = np.arange(4000)
    idx = VectorIndex(32, ANN)
    idx.add(ids, x)
    queries = clustered(100, 32, 40, seed=7)
    recall = np.mean([len(set(idx.search(q, 8)[0].tolist()) & set(brute(x, ids, q, 8))) / 8 for q in queries])
    assert recall >= 0.95
    # returned scores are exact cosines, whatever the graph's float16 storage
    got, scores = idx.search(queries[0], 8)
    assert np.allclose(scores, x[got] @ queries[0], atol=1e-5)


def test_identical_vectors_share_a_node_and_keep_older_first():
    rng = np.random.default_rng(0)
    same = unit_rows(rng.standard_normal((1, 12)))[0]
    others = unit_rows(rng.standard_normal((50, 12)))
    x = np.vstack([others[:20], np.repeat(same[None], 500, axis=0), others[20:]])
    ids = rng.permutation(np.arange(10, 10 + len(x)))  # arrival order is not id order
    idx = VectorIndex(12, ANN)
    idx.add(ids, x)
    assert idx.n_groups == 51
    tied = np.sort(ids[20:520])
    got, _ = idx.search(same, 3)
    assert got.tolist() == tied[:3].tolist()
    got, _ = idx.search(same, 3, keep_ties=True)
    assert sorted(got.tolist()) == tied.tolist()


def test_candidates_restrict_search_in_both_modes():
    x = clustered(3000, 24, 30)
    ids = np.arange(3000)
    cand = np.arange(0, 3000, 7)
    for cfg in (IndexConfig(), IndexConfig(exact_below=0, exact_candidates=10)):
        idx = VectorIndex(24, cfg)
        idx.add(ids, x)
        for q in clustered(10, 24, 30, seed=3):
            got, _ = idx.search(q, 5, candidates=cand)
            assert set(got.tolist()) <= set(cand.tolist()) and len(got) == 5
            want = brute(x[cand], cand, q, 5)
            assert len(set(got.tolist()) & set(want)) >= 4
    assert idx.search(x[0], 5, candidates=[10**9, -3])[0].size == 0


def test_remove_and_replace():
    x = clustered(2000, 16, 20)
    idx = VectorIndex(16, ANN)
    idx.add(np.arange(2000), x)
    idx.remove(np.arange(0, 1500))  # compacts
    assert len(idx) == 500 and idx.ids().tolist() == list(range(1500, 2000))
    got, _ = idx.search(x[3], 10)
    assert all(i >= 1500 for i in got.tolist())
    idx.add([1600], x[3:4])  # replace a vector
    assert idx.search(x[3], 1)[0].tolist() == [1600]
    assert np.allclose(idx.vector(1600), x[3])
    with pytest.raises(ICDError):
        idx.add([1], np.ones((1, 5)))


def test_save_load_reconciles_with_the_store(tmp_path):
    x = clustered(1500, 16, 20)
    ids = np.arange(1, 1501)
    path = tmp_path / "image.usearch"
    idx = VectorIndex(16, ANN)
    idx.add(ids[:1000], x[:1000])
    idx.save(path)

    same, how = VectorIndex.load(path, ids[:1000], x[:1000], ANN)
    assert how == "loaded"
    q = x[17]
    assert same.search(q, 8)[0].tolist() == idx.search(q, 8)[0].tolist()

    # the store moved on (crash after the last save): 500 new demos, 100 evicted
    grown, how = VectorIndex.load(path, ids[100:], x[100:], ANN)
    assert how == "loaded+600"
    assert len(grown) == 1400 and grown.n_groups == 1400
    assert grown.search(x[1200], 1)[0].tolist() == [1201]
    assert 1 not in grown and grown.search(x[0], 1)[0].tolist() != [1]

    # the store is the truth: a vector changed under an id is re-indexed, not trusted from the file
    changed = x[:1000].copy()
    changed[10] = x[1400]
    fixed, how = VectorIndex.load(path, ids[:1000], changed, ANN)
    assert how == "loaded+2"
    assert fixed.search(x[1400], 1)[0].tolist() == [11]


def test_load_rebuilds_a_wrong_or_broken_file(tmp_path):
    x = clustered(600, 16, 10)
    ids = np.arange(600)
    path = tmp_path / "a.usearch"
    a = VectorIndex(16, ANN)
    a.add(ids, x)
    a.save(path)
    # a graph from another pool with this pool's group table: the vector sample check catches it
    other = VectorIndex(16, ANN)
    other.add(ids, clustered(600, 16, 10, seed=5))
    other.save(tmp_path / "b.usearch")
    shutil.copy(tmp_path / "b.usearch", path)
    idx, how = VectorIndex.load(path, ids, x, ANN)
    assert how.startswith("built") and "differ" in how
    assert idx.search(x[42], 1)[0].tolist() == [42]

    path.write_bytes(b"garbage" * 10)
    idx, how = VectorIndex.load(path, ids, x, ANN)
    assert how.startswith("built") and idx.search(x[7], 1)[0].tolist() == [7]

    idx, how = VectorIndex.load(path, ids, x[:, :8], ANN)  # dimension changed
    assert how.startswith("built") and idx.ndim == 8


@pytest.mark.parametrize("cfg", [IndexConfig(), ANN])
def test_ties_across_groups_interleave_by_id(cfg):
    # two different vectors at the same cosine to the query: their members merge in id order
    a, b = unit_rows(np.array([[0.6, 0.8, 0.0, 0.0], [0.6, 0.0, 0.8, 0.0]]))
    far = unit_rows(np.random.default_rng(1).standard_normal((40, 4)) * [0.1, 1, 1, 1])
    x = np.vstack([far[:20], a, b, b, a, far[20:]])
    ids = np.arange(len(x))
    idx = VectorIndex(4, cfg)
    idx.add(ids, x)
    q = np.array([1.0, 0, 0, 0])
    got, scores = idx.search(q, 3)
    assert got.tolist() == [20, 21, 22] and np.allclose(scores, 0.6)
    got, _ = idx.search(q, 2, keep_ties=True)
    assert got.tolist() == [20, 21, 22, 23]
    got, _ = idx.search(q, 2, candidates=[23, 22, 5])
    assert got.tolist() == [22, 23]


def test_matrix_is_a_read_only_view_until_rows_are_removed():
    """At 1M x 1280 a copy of the matrix is 5 GB: the benchmark's exact truth ran out of memory."""
    rng = np.random.default_rng(0)
    index = VectorIndex(16, IndexConfig(exact_below=10))
    vecs = unit_rows(rng.standard_normal((40, 16)))
    index.add(np.arange(40), vecs)
    ids, mat = index.matrix()
    assert np.shares_memory(mat, index._mat) and np.array_equal(ids, np.arange(40))
    with pytest.raises(ValueError):
        mat[0, 0] = 2.0
    index.remove([3, 7])
    ids, mat = index.matrix()
    assert 3 not in ids and 7 not in ids and len(mat) == 38
    np.testing.assert_array_equal(mat, np.delete(vecs, [3, 7], axis=0))
    # the view handed out before a later add keeps its rows; the index itself stays writable
    index.add([100], unit_rows(rng.standard_normal((1, 16))))
    assert 100 in index.matrix()[0]
