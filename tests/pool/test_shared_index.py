"""Workers on one host share one saved, memory-mapped index (issue 18, item 5).

Unit tests of the layered index (a mapped snapshot beside an in-RAM delta) against one ``VectorIndex``
over the same vectors, of torn snapshots, and of ``PostgresPool`` workers on a real PostgreSQL
cluster sharing a snapshot folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from icdistill.pool.index import IndexConfig, VectorIndex
from icdistill.pool.index_snapshot import SharedIndexConfig, SnapshotStore, shared_index_from_env
from icdistill.pool.shared_index import LayeredIndex, MappedIndex
from icdistill.types import ANSWER, IMAGE

pytest.importorskip("usearch")

EXACT = IndexConfig(exact_below=10**9)
ANN = IndexConfig(exact_below=64, exact_candidates=16)


def vectors(n: int, d: int = 16, seed: int = 0, twins: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, d)).astype(np.float32)
    m[:twins] = m[0]  # a group of identical vectors: ties decided by age
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def layered(
    tmp: Path, ids: np.ndarray, mat: np.ndarray, cfg: IndexConfig
) -> tuple[LayeredIndex, SnapshotStore]:
    store = SnapshotStore(tmp / "host")
    full = VectorIndex(mat.shape[1], cfg)
    full.add(ids, mat)
    with store.locked():
        store.write("k", full)
    snap = store.open("k", cfg)
    assert snap is not None
    return LayeredIndex(MappedIndex(snap, cfg), VectorIndex(mat.shape[1], cfg)), store


@pytest.mark.parametrize("cfg", [EXACT, ANN], ids=["exact", "ann"])
def test_a_mapped_snapshot_with_a_delta_searches_like_one_index(tmp_path, cfg):
    mat = vectors(600, twins=40)
    ids = np.arange(1, 601)
    one = VectorIndex(16, cfg)
    one.add(ids[:500], mat[:500])
    two, _ = layered(tmp_path, ids[:500], mat[:500], cfg)
    one.add(ids[500:], mat[500:])  # demos added after the snapshot
    two.add(ids[500:], mat[500:])
    gone = [3, 7, 250, 520, 1]  # removed in both layers, one of them a twin
    one.remove(gone)
    two.remove(gone)
    assert len(one) == len(two) == 595 and 520 not in two and 521 in two and 3 not in two
    queries = vectors(40, seed=1)
    queries[0] = mat[0]  # the twins' direction: a 39-way tie
    cands = np.arange(0, 700, 3)
    for q in queries:
        for k, c, ties in ((8, None, False), (8, None, True), (5, cands, False), (30, None, True)):
            a = one.search(q, k, c, keep_ties=ties)
            b = two.search(q, k, c, keep_ties=ties)
            assert a[0].tolist() == b[0].tolist()
            np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    np.testing.assert_array_equal(two.vector(600), one.vector(600))


def test_a_torn_snapshot_is_never_opened(tmp_path):
    mat = vectors(100)
    _, store = layered(tmp_path, np.arange(100), mat, EXACT)
    gen = store.key_dir("k") / "gen-1"
    # a writer killed mid-write leaves a tmp folder: never named by CURRENT, so never read
    (store.key_dir("k") / "gen-2.tmp-999").mkdir()
    assert store.open("k", EXACT) is not None
    for name in ("vectors.npy", "graph.usearch", "gmembers.npy"):
        data = (gen / name).read_bytes()
        (gen / name).write_bytes(data[: len(data) // 2])
        assert store.open("k", EXACT) is None, name
        (gen / name).write_bytes(data)
    assert store.open("k", EXACT) is not None
    (store.key_dir("k") / "CURRENT").write_text('{"gen": 1, "sizes": ')  # torn CURRENT
    assert store.open("k", EXACT) is None
    # other HNSW settings: not this index's graph
    assert store.open("k", IndexConfig(connectivity=16)) is None


def test_the_snapshot_folder_is_configurable_and_can_be_off(tmp_path):
    assert shared_index_from_env({"ICD_POOL_CACHE": "off"}) is None
    assert shared_index_from_env({"ICD_POOL_CACHE": str(tmp_path)}).root == tmp_path  # type: ignore[union-attr]
    got = shared_index_from_env({"XDG_CACHE_HOME": str(tmp_path)})
    assert got is not None and got.root == tmp_path / "icdistill" / "pool-index"


# ---------------------------------------------------------------------- workers on PostgreSQL
psycopg = pytest.importorskip("psycopg")

from test_pool_pg import ann, item  # noqa: E402

from fakes import wait_for  # noqa: E402
from icdistill.pool import PostgresPool  # noqa: E402


def emb(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {
        IMAGE: rng.standard_normal(16).astype(np.float32),
        ANSWER: rng.standard_normal(4).astype(np.float32),
    }


def fill(url: str, n: int, start: int = 0) -> None:
    with PostgresPool(url) as pool:
        for i in range(start, start + n):
            pool.add(item(i), ann(), emb(i))


def shared(tmp: Path, **kw: object) -> SharedIndexConfig:
    return SharedIndexConfig(tmp / "cache", **kw)  # type: ignore[arg-type]


def files_of(pool: PostgresPool) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file of the pool's current snapshots."""
    out = {}
    for p in sorted(pool._index.store.folder.rglob("gen-*/*")):  # type: ignore[attr-defined]
        st = p.stat()
        out[str(p)] = (st.st_ino, st.st_mtime_ns)
    return out


def test_a_second_worker_maps_the_saved_index_instead_of_rebuilding(url, tmp_path):
    fill(url, 40)
    cfg = shared(tmp_path)
    with PostgresPool(url, shared_index=cfg) as a:
        assert a.index_status() == {IMAGE: "built gen 1", ANSWER: "built gen 1"}
        assert a._index.store.writes == 2  # type: ignore[attr-defined]
        before = files_of(a)
        with PostgresPool(url, shared_index=cfg) as b:
            assert b.index_status() == {IMAGE: "mapped gen 1", ANSWER: "mapped gen 1"}
            assert b._index.store.writes == 0  # type: ignore[attr-defined]
            assert files_of(b) == before  # the same files, not rewritten
            assert len(b) == 40
            got, _ = b.search(IMAGE, emb(7)[IMAGE], 1)
            assert [b.get(i).query_id for i in got.tolist()] == ["q7"]
            # the vectors are the mapped file's pages, not a copy in this process
            maps = Path(f"/proc/{os.getpid()}/maps").read_text()
            assert "vectors.npy" in maps and "graph.usearch" in maps


@pytest.mark.parametrize("cfg", [IndexConfig(), ANN], ids=["exact", "ann"])
def test_search_with_the_shared_index_equals_search_without(url, tmp_path, cfg):
    fill(url, 150)
    with (
        PostgresPool(url, index=cfg, shared_index=shared(tmp_path)) as a,
        PostgresPool(url, index=cfg) as plain,
    ):
        fill(url, 30, start=150)  # after the snapshot: the delta
        wait_for(lambda: len(a) == len(plain) == 180, "the demos added after the snapshot, notified")
        for j in range(25):
            q = np.random.default_rng(1000 + j).standard_normal(16).astype(np.float32)
            for key, vec in ((IMAGE, q), (ANSWER, q[:4])):
                for k, ties in ((1, False), (8, False), (8, True)):
                    x, sx = a.search(key, vec, k, keep_ties=ties)
                    y, sy = plain.search(key, vec, k, keep_ties=ties)
                    assert x.tolist() == y.tolist()
                    np.testing.assert_allclose(sx, sy, atol=1e-6)


def test_a_demo_added_after_the_snapshot_is_found(url, tmp_path):
    fill(url, 20)
    cfg = shared(tmp_path)
    with PostgresPool(url, shared_index=cfg) as a, PostgresPool(url, shared_index=cfg) as b:
        b.add(item(500), ann(), emb(500))  # b's delta now; a's once the notification is applied
        wait_for(lambda: len(a) == 21, "b's demo, notified to a")
        for pool in (a, b):
            got, _ = pool.search(IMAGE, emb(500)[IMAGE], 1)
            assert [pool.get(i).query_id for i in got.tolist()] == ["q500"]
        with PostgresPool(url, shared_index=cfg) as c:  # a new worker: the snapshot plus what it lacks
            assert c.index_status()[IMAGE] == "mapped gen 1 +1"
            got, _ = c.search(IMAGE, emb(500)[IMAGE], 1)
            assert [c.get(i).query_id for i in got.tolist()] == ["q500"]


def test_a_snapshot_merge_runs_outside_the_listeners_lock(url, tmp_path):
    """A merge can take minutes at scale: while it runs, the listener (images, claim renewals from
    the heartbeat's thread) must stay free. The roll is called after a refresh or an add, with no
    lock held; another thread checks the lock while the roll is running."""
    import threading

    fill(url, 20)
    cfg = shared(tmp_path)
    with PostgresPool(url, shared_index=cfg) as a, PostgresPool(url, shared_index=cfg) as b:
        free_during_roll: list[bool] = []

        def probe() -> None:
            got = a._listen_lock.acquire(blocking=False)
            if got:
                a._listen_lock.release()
            free_during_roll.append(got)

        def roll(force: bool = False) -> None:
            t = threading.Thread(target=probe)
            t.start()
            t.join()

        a._index.maybe_roll = roll  # type: ignore[attr-defined]
        b.add(item(500), ann(), emb(500))
        wait_for(lambda: len(a) == 21, "b's demo, notified to a")  # refresh applies it, then rolls
        a.add(item(501), ann(), emb(501))  # its own add rolls too
        assert free_during_roll and all(free_during_roll)


def test_a_torn_snapshot_is_rebuilt_by_the_next_worker(url, tmp_path):
    fill(url, 30)
    cfg = shared(tmp_path)
    with PostgresPool(url, shared_index=cfg) as a:
        folder = a._index.store.key_dir(IMAGE) / "gen-1"  # type: ignore[attr-defined]
    graph = folder / "graph.usearch"
    graph.write_bytes(graph.read_bytes()[:100])  # a crash mid-write of a file CURRENT names
    with PostgresPool(url, shared_index=cfg) as b:
        assert b.index_status() == {IMAGE: "built gen 2", ANSWER: "mapped gen 1"}
        got, _ = b.search(IMAGE, emb(11)[IMAGE], 1)
        assert [b.get(i).query_id for i in got.tolist()] == ["q11"]


def test_a_growing_delta_becomes_a_new_generation_that_other_workers_map(url, tmp_path):
    fill(url, 20)
    cfg = shared(tmp_path, merge_at=5, check_s=0.0)
    with PostgresPool(url, shared_index=cfg) as a, PostgresPool(url, shared_index=cfg) as b:
        for i in range(100, 112):
            a.add(item(i), ann(), emb(i))
        assert a.index_status()[IMAGE].startswith("mapped gen ") and a.index_status()[IMAGE] != "mapped gen 1"
        wait_for(lambda: len(b) == 32, "a's demos, notified to b")  # b maps newer generations as it goes
        for pool in (a, b):
            pool._index.maybe_roll(force=True)  # type: ignore[attr-defined]
        gen = a._index.store.current_gen(IMAGE)  # type: ignore[attr-defined]
        assert gen is not None and gen > 1
        # a worker holding a demo the writer had not applied yet keeps it in its delta ("+1")
        assert {p.index_status()[IMAGE].split(" +")[0] for p in (a, b)} == {f"mapped gen {gen}"}
        a.remove(3)  # gone for every worker, whichever generation it maps
        for i in (0, 5, 105, 111):
            for pool in (a, b):
                got, _ = pool.search(IMAGE, emb(i)[IMAGE], 1)
                assert [pool.get(j).query_id for j in got.tolist()] == [f"q{i}"]
        assert 3 not in b.search(IMAGE, emb(3)[IMAGE], 3)[0].tolist()
        # old generations are deleted as new ones come (mapped pages stay readable)
        assert len(list(a._index.store.key_dir(IMAGE).glob("gen-*"))) <= 2  # type: ignore[attr-defined]


_SECOND_WORKER = """
import sys
import numpy as np
from pathlib import Path
sys.path[:0] = [{tests!r}, {tests!r} + '/..']
from icdistill.pool import PostgresPool
from icdistill.pool.index_snapshot import SharedIndexConfig
from test_shared_index import mapped_kb
pool = PostgresPool({url!r}, shared_index=SharedIndexConfig(Path({root!r})))
ids, mat = pool.vectors("image")
float(np.asarray(mat).sum())  # every page read
print(pool.index_status()["image"], *mapped_kb("image/gen-1/vectors.npy"), flush=True)
sys.stdin.read()
pool.close()
"""


def mapped_kb(name: str) -> tuple[int, int]:
    """(Rss, Pss) in kB of this process's mappings of the file whose path ends with ``name``."""
    rss = pss = 0
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            inside = line.rstrip().endswith("/" + name)
        elif inside and head[0] == "Rss:":
            rss += int(head[1])
        elif inside and head[0] == "Pss:":
            pss += int(head[1])
    return rss, pss


def test_two_workers_map_the_same_vector_pages_once(url, tmp_path):
    """Measured, not assumed: both workers have every page of the snapshot's vectors resident, and
    the kernel splits them between the two (PSS halves), so the second worker adds no copy."""
    import subprocess
    import sys

    n = 2000
    fill(url, n)
    cfg = shared(tmp_path)
    with PostgresPool(url, shared_index=cfg) as a:
        float(np.asarray(a.vectors(IMAGE)[1]).sum())
        alone_rss, alone_pss = mapped_kb("image/gen-1/vectors.npy")
        assert alone_rss >= n * 16 * 4 // 1024 and alone_pss >= 0.9 * alone_rss  # resident, and ours alone
        script = _SECOND_WORKER.format(tests=str(Path(__file__).parent), url=url, root=str(cfg.root))
        b = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            parts = b.stdout.readline().split()  # type: ignore[union-attr]
            float(np.asarray(a.vectors(IMAGE)[1]).sum())  # resident again (memory pressure may evict)
            both_rss, a_pss = mapped_kb("image/gen-1/vectors.npy")  # measured while b still maps the file
        finally:
            b.stdin.close()  # type: ignore[union-attr]
            b.wait()
        assert b.returncode == 0
        assert " ".join(parts[:-2]) == "mapped gen 1"
        b_rss, b_pss = int(parts[-2]), int(parts[-1])
        # the pages are resident in both (clean file pages: a loaded machine may evict a few) ...
        assert min(b_rss, both_rss) >= 0.5 * alone_rss
        # ... and each is counted half to each worker: one copy for the two, not two
        assert a_pss <= 0.6 * both_rss and b_pss <= 0.6 * b_rss


def test_an_unusable_snapshot_folder_leaves_the_worker_its_own_index(url, tmp_path):
    fill(url, 10)
    root = tmp_path / "not-a-folder"
    root.write_text("a file where the cache folder should be")
    with PostgresPool(url, shared_index=SharedIndexConfig(root)) as pool:
        assert not any(s.startswith(("mapped", "built gen")) for s in pool.index_status().values())
        got, _ = pool.search(IMAGE, emb(4)[IMAGE], 1)
        assert [pool.get(i).query_id for i in got.tolist()] == ["q4"]


def test_workers_starting_together_build_the_snapshot_once(url, tmp_path):
    """The host's lock: of two workers opening a new pool folder at once, one builds, the other waits
    for it and maps what it wrote."""
    import threading

    fill(url, 30)
    cfg = shared(tmp_path)
    pools: list[PostgresPool] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            pools.append(PostgresPool(url, shared_index=cfg))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        assert sorted(p.index_status()[IMAGE] for p in pools) == ["built gen 1", "mapped gen 1"]
        assert sum(p._index.store.writes for p in pools) == 2  # type: ignore[attr-defined]  # one per key
    finally:
        for p in pools:
            p.close()
