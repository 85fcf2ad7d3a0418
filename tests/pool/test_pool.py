import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from icdistill.errors import ICDError
from icdistill.pool import SQLitePool
from icdistill.types import ANSWER, IMAGE, Annotation, Query


def make_query(i: int, colour=None) -> Query:
    img = Image.new("RGB", (8, 8), colour or (i % 256, (3 * i) % 256, 7))
    return Query(
        id=f"q{i}", image=img, prompt="what?", options=("a", "b"), label="a", position=i, image_ref=f"ref{i}"
    )


def ann(answer="a", accepted=True, agreement=1.0) -> Annotation:
    return Annotation(
        answer=answer,
        samples=[answer],
        votes={answer: 1},
        agreement=agreement,
        accepted=accepted,
        teacher="t",
    )


def emb(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {IMAGE: rng.standard_normal(4), ANSWER: rng.standard_normal(3)}


def test_add_reopen_roundtrip(tmp_path):
    path = tmp_path / "pool.sqlite"
    with SQLitePool(path) as pool:
        for i in range(5):
            demo, status = pool.add(make_query(i), ann("b" if i % 2 else "a"), emb(i))
            assert status == "added" and demo is not None
        ids, mat = pool.vectors(IMAGE)
        assert len(ids) == 5 and mat.shape == (5, 4)
        assert np.allclose(np.linalg.norm(mat, axis=1), 1.0)
    with SQLitePool(path) as pool:
        assert len(pool) == 5
        d = pool.demos()[1]
        assert d.answer == "b" and d.query_id == "q1" and d.image.size == (8, 8)
        assert d.provenance["teacher"] == "t" and d.provenance["position"] == 1
        ids2, mat2 = pool.vectors(IMAGE)
        assert ids2 == ids and np.allclose(mat2, mat)
        assert pool.answers() == {"a": 3, "b": 2}


def test_rejected_stored_not_indexed(tmp_path):
    with SQLitePool(tmp_path / "p.sqlite") as pool:
        demo, status = pool.add(make_query(1), ann(accepted=False, agreement=0.3), emb(1))
        assert demo is None and status == "rejected" and len(pool) == 0
        stored = pool.annotation_for("q1")
        assert stored is not None and not stored.accepted and stored.agreement == 0.3
        assert pool.stats()["rejected"] == 1


def test_dedup_and_exists(tmp_path):
    with SQLitePool(tmp_path / "p.sqlite") as pool:
        pool.add(make_query(1, colour=(1, 2, 3)), ann(), emb(1))
        q2 = make_query(2, colour=(1, 2, 3))  # same image and prompt, another query
        assert pool.add(q2, ann(), emb(2))[1] == "duplicate"
        assert pool.add(make_query(1, colour=(1, 2, 3)), ann(), emb(1))[1] == "exists"
        assert len(pool) == 1


def test_eviction_keeps_newest(tmp_path):
    path = tmp_path / "p.sqlite"
    with SQLitePool(path, max_size=3) as pool:
        for i in range(6):
            pool.add(make_query(i), ann(), emb(i))
        assert [d.query_id for d in pool.demos()] == ["q3", "q4", "q5"]
        assert len(pool.vectors(IMAGE)[0]) == 3
    with SQLitePool(path, max_size=3) as pool:
        assert [d.query_id for d in pool.demos()] == ["q3", "q4", "q5"]
        assert pool.stats()["evicted"] == 3


def test_corrupt_file_clear_error(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ICDError, match="pool"):
        SQLitePool(bad)


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from PIL import Image
    from icdistill.pool import SQLitePool
    from icdistill.types import Annotation, Query, IMAGE
    pool = SQLitePool(sys.argv[1])
    i = 0
    while True:
        q = Query(id=f"q{i}", image=Image.new("RGB", (16, 16), (i % 256, i // 256 % 256, 1)), prompt="p", position=i)
        a = Annotation(answer=str(i % 3), samples=["x"], votes={"x": 1}, agreement=1.0, accepted=True, teacher="t")
        pool.add(q, a, {IMAGE: np.ones(8)})
        print(i + 1, flush=True)
        i += 1
    """
)


def test_sigkill_mid_run_loses_no_committed_demo(tmp_path):
    path = tmp_path / "pool.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    committed = 0
    for line in proc.stdout:
        committed = int(line)
        if committed >= 60:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert committed >= 60
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    with SQLitePool(path) as pool:
        assert len(pool) >= committed
        ids = [d.query_id for d in pool.demos()]
        assert ids[:committed] == [f"q{i}" for i in range(committed)]
        assert len(pool.vectors(IMAGE)[0]) == len(pool)


def test_pool_file_lock_for_one_writer(tmp_path):
    path = tmp_path / "pool.sqlite"
    first = SQLitePool(path, lock=True)
    with pytest.raises(ICDError, match="in use by another process"):
        SQLitePool(path, lock=True)
    first.close()
    SQLitePool(path, lock=True).close()  # released on close
