"""A pool holds each vector once, in its index: demos read theirs from it (a 1M x 1280 pool whose
vectors were held three to four times did not open in 24 GB; BENCHMARKS.md section 7). Demos' images
stay in the database until read, through a bounded cache."""

import pickle
import sqlite3
import threading

import numpy as np
import pytest
from PIL import Image
from test_pool import ann, emb, make_query

from icdistill.errors import ICDError
from icdistill.pool import IndexConfig, IndexedEmbeddings, SQLitePool, StoredDemo, VectorIndex, unit_rows
from icdistill.types import ANSWER, IMAGE, Demo, Query


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


def _filled(path, n=6):
    with SQLitePool(path) as pool:
        for i in range(n):
            pool.add(make_query(i), ann(), emb(i))
        pool.add(Query(id="blank", image=None, prompt="what?", options=("a", "b")), ann(), emb(99))


def test_opening_a_pool_decodes_no_image_and_a_demo_reads_its_own_on_use(tmp_path):
    path = tmp_path / "pool.sqlite"
    _filled(path)
    with SQLitePool(path) as pool:
        assert pool.images.decoded == 0 and len(pool.images.cache) == 0
        demos = {d.query_id: d for d in pool.demos()}
        first = demos["q0"]
        assert isinstance(first, StoredDemo)
        assert first.image.tobytes() == make_query(0).image.tobytes()
        assert first.image.size == (8, 8) and pool.images.decoded == 1
        assert first.image is first.image and pool.images.decoded == 1  # cached, not decoded again
        assert demos["blank"].image is None and pool.images.decoded == 1  # no image: no read
        for i in range(1, 6):
            assert demos[f"q{i}"].image.getpixel((0, 0)) == make_query(i).image.getpixel((0, 0))
        assert pool.images.decoded == 6


def test_the_image_cache_is_bounded_and_an_evicted_image_is_read_again(tmp_path):
    path = tmp_path / "pool.sqlite"
    _filled(path)
    with SQLitePool(path) as pool:
        pool.images.cache.max_items = 2
        demos = sorted((d for d in pool.demos() if d.query_id != "blank"), key=lambda d: d.id)
        for d in demos:
            assert d.image is not None
        assert len(pool.images.cache) == 2 and pool.images.decoded == 6
        assert demos[0].image.getpixel((0, 0)) == make_query(0).image.getpixel((0, 0))
        assert pool.images.decoded == 7


def test_a_demo_just_added_serves_its_image_without_a_read(tmp_path):
    with SQLitePool(tmp_path / "pool.sqlite") as pool:
        demo, _ = pool.add(make_query(3), ann(), emb(3))
        assert demo.image.getpixel((0, 0)) == make_query(3).image.getpixel((0, 0))
        assert pool.images.decoded == 0
        pool.images.cache.clear()
        pool.images.cache.max_items = 0  # nothing cached from here on
        for _ in range(2):
            assert demo.image.getpixel((0, 0)) == make_query(3).image.getpixel((0, 0))
        assert pool.images.decoded == 2


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_demo_image_can_be_read_from_another_thread(tmp_path, in_memory):
    # the service reads demos on its loop thread, which did not open the pool
    pool = SQLitePool(None if in_memory else tmp_path / "pool.sqlite")
    with pool:
        demo, _ = pool.add(make_query(5), ann(), emb(5))
        pool.images.cache.clear()
        seen: list[object] = []
        t = threading.Thread(target=lambda: seen.append(demo.image.getpixel((0, 0))))
        t.start()
        t.join()
        assert seen == [make_query(5).image.getpixel((0, 0))] and pool.images.decoded == 1


def test_a_corrupt_stored_image_is_a_clear_error_on_use_not_on_open(tmp_path):
    path = tmp_path / "pool.sqlite"
    _filled(path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE annotations SET image_png = ? WHERE query_id = 'q2'", (b"not a png",))
    with SQLitePool(path) as pool:
        demos = {d.query_id: d for d in pool.demos()}
        assert demos["q1"].image is not None
        with pytest.raises(
            ICDError, match=rf"image of demo {demos['q2'].id} in pool .*pool.sqlite is corrupt"
        ):
            _ = demos["q2"].image


def test_a_pickled_or_copied_pooled_demo_is_a_plain_demo_with_its_image(tmp_path):
    path = tmp_path / "pool.sqlite"
    _filled(path)
    with SQLitePool(path) as pool:
        stored = next(d for d in pool.demos() if d.query_id == "q4")
        copy = pickle.loads(pickle.dumps(stored))
    assert type(copy) is Demo and copy.id == stored.id and copy.answer == "a"
    assert copy.image.getpixel((0, 0)) == make_query(4).image.getpixel((0, 0))
    np.testing.assert_allclose(
        copy.embeddings[IMAGE], emb(4)[IMAGE] / np.linalg.norm(emb(4)[IMAGE]), rtol=1e-6
    )
    assert copy.provenance["image_ref"] == "ref4"


def test_a_pooled_demos_image_cannot_be_replaced(tmp_path):
    with SQLitePool(tmp_path / "pool.sqlite") as pool:
        demo, _ = pool.add(make_query(1), ann(), emb(1))
        with pytest.raises(AttributeError, match="read from its pool"):
            demo.image = Image.new("RGB", (2, 2))


def _bulk_pool(path, n: int, dim: int) -> np.ndarray:
    """A pool file of ``n`` demos with ``dim``-d image vectors, written in one transaction."""
    SQLitePool(path).close()  # the schema
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO annotations (id, query_id, position, prompt, answer, accepted, in_pool, status) "
            "VALUES (?, ?, ?, 'what?', 'a', 1, 1, 'added')",
            [(i + 1, f"p{i}", i) for i in range(n)],
        )
        db.executemany(
            "INSERT INTO embeddings (demo_id, key, vec) VALUES (?, ?, ?)",
            [(i + 1, IMAGE, x[i].tobytes()) for i in range(n)],
        )
    return x


def test_opening_a_pool_holds_its_vectors_once(tmp_path):
    """The index adopts the matrix the pool reads: no copy of it while it opens, and no grown copy
    at the first adds (at 1M x 1280 these were 5 GB and 6.4 GB beside the 5 GB)."""
    import tracemalloc

    n, dim = 3000, 2048
    x = _bulk_pool(tmp_path / "pool.sqlite", n, dim)
    matrix_bytes = n * dim * 4
    cfg = IndexConfig(exact_below=10**6, expansion_add=16)
    tracemalloc.start()
    try:
        pool = SQLitePool(tmp_path / "pool.sqlite", index=cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with pool:
        # numpy reports its buffers to tracemalloc: the matrix with its spare rows (1.25x; not resident
        # until used) and a few MB of demos and group tables. It was over 3x: read, copied, copied again
        assert peak < 2.0 * matrix_bytes, (peak, matrix_bytes)
        ids, before = pool.vectors(IMAGE)
        np.testing.assert_array_equal(before, x)
        assert list(ids) == list(range(1, n + 1))
        for i in range(20):
            pool.add(make_query(i), ann(), {IMAGE: np.random.default_rng(i).standard_normal(dim)})
        _, after = pool.vectors(IMAGE)
        assert len(after) == n + 20 and np.shares_memory(before, after)  # the adds used spare rows
        np.testing.assert_array_equal(after[:n], x)


def test_an_adopted_matrix_is_normalised_in_place_and_grows_past_its_spare_rows():
    rng = np.random.default_rng(1)
    buffer = np.empty((10 + 6, 8), dtype=np.float32)
    buffer[:10] = rng.standard_normal((10, 8))
    buffer[:3] /= np.linalg.norm(buffer[:3], axis=1, keepdims=True)
    unit_before = buffer[:3].copy()
    index = VectorIndex.build(np.arange(10), buffer)
    _, mat = index.matrix()
    assert np.shares_memory(mat, buffer)
    np.testing.assert_allclose(np.linalg.norm(mat, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(mat[:3], unit_before)  # unit rows stay bit-identical
    index.add(np.arange(10, 16), rng.standard_normal((6, 8)))
    assert np.shares_memory(index.matrix()[1], buffer)
    index.add([16], rng.standard_normal((1, 8)))  # past the spare rows: a grown copy
    ids, mat = index.matrix()
    assert not np.shares_memory(mat, buffer) and ids.tolist() == list(range(17))
    np.testing.assert_array_equal(mat[:16], buffer)
    assert index.search(mat[5], 1)[0].tolist() == [5]
    for bad in (buffer.astype(np.float64), buffer[:, :4], np.asfortranarray(buffer)):
        with pytest.raises(ICDError, match="adopted matrix|rows of dimension"):
            VectorIndex.build(np.arange(10), bad)


def test_values_demos_repeat_are_held_once(tmp_path):
    path = tmp_path / "pool.sqlite"
    _filled(path)
    with SQLitePool(path) as pool:
        demos = [d for d in pool.demos() if d.query_id != "blank"]
        a, b = demos[0], demos[1]
        assert a.provenance["options"] == ["a", "b"] and a.provenance["options"] is b.provenance["options"]
        assert a.provenance["votes"] == {"a": 1} and a.provenance["votes"] is b.provenance["votes"]
        assert a.prompt is b.prompt and a.answer is b.answer
        assert a.provenance["image_ref"] == "ref0" and b.provenance["image_ref"] == "ref1"


def test_a_pool_in_a_folder_whose_name_reads_as_uri_syntax_serves_its_images(tmp_path):
    # the image reader opens the file by URI: "#", "?" and "%" in the path cut or changed it
    path = tmp_path / "run #1?x=100%25" / "pool.sqlite"
    _filled(path, n=2)
    with SQLitePool(path) as pool:
        demo = next(d for d in pool.demos() if d.query_id == "q1")
        assert demo.image.getpixel((0, 0)) == make_query(1).image.getpixel((0, 0))


def test_a_closed_pools_demo_image_is_a_clear_error_and_opens_no_connection(tmp_path):
    # its image reader, never opened before the pool closed, was opened then and never closed
    path = tmp_path / "pool.sqlite"
    _filled(path, n=2)
    pool = SQLitePool(path)
    demo = next(d for d in pool.demos() if d.query_id == "q1")
    pool.close()
    with pytest.raises(ICDError, match=rf"cannot read the image of demo {demo.id} from pool .*closed"):
        _ = demo.image
    assert pool._reader is None


def test_a_pooled_demos_repr_reads_no_image(tmp_path):
    # the dataclass repr read (and decoded) the image, and raised once the pool was closed
    path = tmp_path / "pool.sqlite"
    _filled(path, n=2)
    pool = SQLitePool(path)
    demo = next(d for d in pool.demos() if d.query_id == "q1")
    assert "q1" in repr(demo) and pool.images.decoded == 0
    pool.close()
    assert f"StoredDemo(id={demo.id}, query_id='q1'" in repr(demo)


def test_a_relative_pool_path_still_serves_images_after_a_chdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _filled("pool.sqlite")
    with SQLitePool("pool.sqlite") as pool:
        demo = next(d for d in pool.demos() if d.query_id == "q2")
        monkeypatch.chdir(tmp_path.parent)  # the reader opens on the first read, from elsewhere
        assert demo.image.tobytes() == make_query(2).image.tobytes()
