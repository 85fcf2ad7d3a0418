"""The shared PostgreSQL pool against a real server (a throwaway Debian PostgreSQL cluster)."""

import itertools
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakes import wait_for
from icdistill.errors import ICDError, TeacherError
from icdistill.pool import ClaimingAnnotator, PostgresPool, is_postgres_url
from icdistill.types import ANSWER, IMAGE, Annotation, Query, Usage

pytest.importorskip("psycopg")


def item(i: int, qid: str | None = None) -> Query:
    img = Image.new("RGB", (6, 6), (i % 256, (i // 256) % 256, 9))
    return Query(id=qid or f"q{i}", image=img, prompt="what?", options=("a", "b"), label="a", position=i)


def ann(answer="a", accepted=True, cost=0.0) -> Annotation:
    return Annotation(
        answer=answer,
        samples=[answer],
        votes={answer: 1},
        agreement=1.0,
        accepted=accepted,
        teacher="t",
        usage=Usage(calls=1, cost_usd=cost),
    )


def emb(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {
        IMAGE: rng.standard_normal(8).astype(np.float32),
        ANSWER: rng.standard_normal(4).astype(np.float32),
    }


def wait_until_lock_waiting(url: str, pool: PostgresPool) -> None:
    """Until ``pool``'s connection waits on a row lock (another transaction holds it)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        deadline = time.monotonic() + 60
        while not admin.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
            (pool._db.info.backend_pid,),
        ).fetchone():
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_url_detection():
    assert is_postgres_url("postgresql://u@h/db") and is_postgres_url("postgres://h/db")
    assert not is_postgres_url("runs/pool.sqlite") and not is_postgres_url(None)


def test_statuses_roundtrip_and_search(url):
    with PostgresPool(url) as pool:
        for i in range(5):
            demo, status = pool.add(item(i), ann("b" if i % 2 else "a", cost=0.01), emb(i))
            assert status == "added" and demo is not None
        assert pool.add(item(9), ann(accepted=False), emb(9))[1] == "rejected"
        assert pool.add(item(1, qid="twin"), ann(), emb(1))[1] == "duplicate"
        assert pool.add(item(2), ann(), emb(2))[1] == "exists"
        got, _ = pool.search(IMAGE, emb(3)[IMAGE], 1)
        assert [pool.get(i).query_id for i in got.tolist()] == ["q3"]
        assert pool.stats() == {"added": 5, "rejected": 1, "duplicate": 1, "evicted": 0, "pool_size": 5}
        assert pool.ledger_state()["cost_usd"] == pytest.approx(0.05)
    with PostgresPool(url) as pool:
        assert len(pool) == 5 and pool.answers() == {"a": 3, "b": 2}
        d = pool.demos()[1]
        assert d.answer == "b" and d.image.size == (6, 6) and d.provenance["options"] == ["a", "b"]
        stored = pool.annotation_for("q9")
        assert stored is not None and not stored.accepted
        assert pool.demo_like(item(3, qid="other")).query_id == "q3"


def test_another_workers_demo_is_seen_within_a_second(url):
    with PostgresPool(url) as a, PostgresPool(url) as b:
        assert len(b) == 0
        a.add(item(1), ann(), emb(1))
        wait_for(lambda: len(b) == 1, "a's demo seen by b")  # on b's next read after the notification
        assert b.search(IMAGE, emb(1)[IMAGE], 1)[0].size == 1


def test_another_workers_demo_image_is_read_from_the_database_on_use(url):
    with PostgresPool(url) as a:
        a.add(item(7), ann(), emb(7))
        a.add(Query(id="blank", image=None, prompt="what?", options=("a", "b")), ann(), emb(8))
    with PostgresPool(url) as b:
        assert b.images.decoded == 0
        demos = {d.query_id: d for d in b.demos()}
        assert demos["q7"].image.tobytes() == item(7).image.tobytes()
        assert demos["blank"].image is None and b.images.decoded == 1


def test_claims_buy_once_and_expire(url):
    with PostgresPool(url, lease_s=0.3) as a, PostgresPool(url, lease_s=0.3) as b:
        assert a.claim(item(1)) == "claimed"
        assert b.claim(item(1, qid="b1")) == "busy"
        a.add(item(1), ann(), emb(1))  # releases the claim in the same transaction
        assert b.claim(item(1, qid="b1")) == "pooled"
        assert a.claim(item(2)) == "claimed"  # and then a dies mid-call: its claim expires
        time.sleep(0.4)
        assert b.claim(item(2, qid="b2")) == "claimed"
        b.release(item(2, qid="b2"))
        assert a.claim(item(2)) == "claimed"
        assert a.ledger_state()["calls"] == 4


def test_global_budget_across_workers(url):
    with PostgresPool(url, max_calls=3) as a, PostgresPool(url) as b:
        results = [p.claim(item(i)) for i, p in zip(range(6), itertools.cycle([a, b]), strict=False)]
        assert results.count("claimed") == 3 and results.count("budget") == 3
        assert b.ledger_state() == {
            "calls": 3,
            "cost_usd": 0.0,
            "max_calls": 3,
            "max_cost_usd": None,
            "dearest_call_usd": 0.0,
        }


def test_the_dollar_cap_is_global_and_reserves_the_calls_in_flight(url):
    """``--max-cost`` was enforced per worker: N workers could spend N times the cap. The ledger now
    holds it; before a call, the dearest call paid so far is reserved for it and for every call
    another worker has in flight (a live claim)."""
    with PostgresPool(url, max_cost_usd=1.0) as a, PostgresPool(url) as b:
        assert a.claim(item(0)) == "claimed"  # nothing paid yet: no estimate, the first call goes
        a.add(item(0), ann(cost=0.3), emb(0))
        assert b.claim(item(1)) == "claimed"  # 0.3 paid + 0.3 reserved for this one
        assert a.claim(item(2)) == "claimed"  # 0.3 + 0.3 x (b's call in flight + this one) = 0.9
        assert b.claim(item(3, qid="b3")) == "budget"  # 0.3 + 0.3 x 3 > 1.0
        assert b.claim(Query(id="t", image=None, prompt="p")) == "budget"  # text-only: same rule
        b.add(item(1), ann(cost=0.25), emb(1))  # b's call lands: 0.55 paid, a's still in flight
        assert b.claim(item(3, qid="b3")) == "budget"  # 0.55 + 0.3 x 2 > 1.0
        a.release(item(2))  # a's call failed: nothing paid, nothing reserved
        assert b.claim(item(3, qid="b3")) == "claimed"  # 0.55 + 0.3 <= 1.0
        state = a.ledger_state()
        assert state["cost_usd"] == pytest.approx(0.55) and state["dearest_call_usd"] == pytest.approx(0.3)
        assert state["max_cost_usd"] == 1.0 and state["calls"] == 4
        with pytest.raises(ICDError, match=r"has --max-cost 1.0, this worker asked for --max-cost 5.0"):
            PostgresPool(url, max_cost_usd=5.0)
    with pytest.raises(ICDError, match="--max-cost must be >= 0"):
        PostgresPool(url, max_cost_usd=-1.0)


def test_a_joining_worker_cannot_move_the_global_cap(url):
    """The last worker to start used to set the cap for every running one (a --max-calls 3 joining a
    pool capped at 50 silently stopped all of them at 3)."""
    with PostgresPool(url, max_calls=50) as a:
        with pytest.raises(ICDError, match="has --max-calls 50, this worker asked for --max-calls 3"):
            PostgresPool(url, max_calls=3)
        with PostgresPool(url, max_calls=50) as b, PostgresPool(url) as c:  # the same cap, or none, joins
            assert (
                a.ledger_state()["max_calls"]
                == b.ledger_state()["max_calls"]
                == c.ledger_state()["max_calls"]
                == 50
            )


def test_eviction_is_shared(url):
    with PostgresPool(url, max_size=3) as a, PostgresPool(url, max_size=3) as b:
        for i in range(4):
            a.add(item(i), ann(), emb(i))
        for i in range(4, 6):
            b.add(item(i), ann(), emb(i))
        wait_for(lambda: sorted(d.query_id for d in a.demos()) == ["q3", "q4", "q5"], "b's evictions seen by a")
        assert sorted(d.query_id for d in b.demos()) == ["q3", "q4", "q5"]
        assert set(a.search(IMAGE, emb(0)[IMAGE], 10)[0].tolist()) == {d.id for d in a.demos()}


class SlowTeacher:
    def __init__(self):
        self.calls = 0

    def annotate(self, query):
        self.calls += 1
        time.sleep(0.05)
        return ann("a")


def test_claiming_annotator_reuses_another_workers_label(url):
    with PostgresPool(url) as a, PostgresPool(url, max_calls=2) as b:  # a global cap: a buys one
        ta, tb = SlowTeacher(), SlowTeacher()
        first = ClaimingAnnotator(ta, a).annotate(item(1))
        a.add(item(1), first, emb(1))
        again = ClaimingAnnotator(tb, b).annotate(item(1, qid="b1"))
        assert tb.calls == 0 and again.answer == "a" and again.usage.calls == 0
        assert b.add(item(1, qid="b1"), again, emb(1))[1] == "duplicate"
        ClaimingAnnotator(tb, b).annotate(item(2))  # the second and last call of the budget
        with pytest.raises(TeacherError, match="budget"):
            ClaimingAnnotator(tb, b).annotate(item(3))


def test_unreachable_server_clear_error():
    with pytest.raises(ICDError, match="cannot connect") as e:
        PostgresPool("postgresql://postgres:secret@127.0.0.1:1/none?connect_timeout=2")
    assert "secret" not in str(e.value)


WORKER = textwrap.dedent(
    """
    import random, sys, time
    sys.path[:0] = [{tests!r}, {tests!r} + '/..']
    from test_pool_pg import item, emb, SlowTeacher
    from icdistill.pool import PostgresPool, ClaimingAnnotator
    from icdistill.errors import NotCalled, TeacherError
    name, seed = sys.argv[1], int(sys.argv[2])
    pool = PostgresPool({url!r}, lease_s={lease_s}, worker=name)
    teacher = SlowTeacher()
    annotator = ClaimingAnnotator(teacher, pool)
    order = list(range({n}))
    random.Random(seed).shuffle(order)
    while order:
        later = []
        for i in order:
            q = item(i, qid=f"{{name}}-{{i}}")
            if pool.demo_like(q) is not None:
                continue
            try:
                a = annotator.annotate(q)
            except NotCalled:
                # another worker held its claim past one lease (a slow call on a busy machine): as a
                # run logs it "not asked", this worker comes back to it after the others
                later.append(i)
                continue
            pool.add(q, a, emb(i))
        order = later
    pool.close()
    print(f"teacher_calls={{teacher.calls}}")
    """
)


def test_workers_killed_mid_call_lose_nothing_and_buy_nothing_twice(url, tmp_path):
    n = 40
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), url=url, n=n, lease_s=1.0))
    PostgresPool(url).close()  # the schema, before anyone polls it
    start = lambda name, seed: subprocess.Popen([sys.executable, str(script), name, str(seed)])  # noqa: E731
    workers = [start(f"w{k}", k) for k in range(3)]
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        killed = 0
        deadline = time.monotonic() + 120
        # SIGKILL two workers at moments when they are most likely inside a teacher call
        while killed < 2 and time.monotonic() < deadline:
            done = conn.execute("SELECT COUNT(*) FROM icd_annotations").fetchone()[0]
            if done >= 8 * (killed + 1):
                time.sleep(0.02)
                workers[killed].send_signal(signal.SIGKILL)
                workers[killed].wait()
                killed += 1
            time.sleep(0.01)
        assert killed == 2
        workers.append(start("w-restarted", 99))  # a replacement picks up where the killed left off
        for w in workers[2:]:
            assert w.wait(timeout=180) == 0
        rows = conn.execute(
            "SELECT image_digest, prompt, status, in_pool FROM icd_annotations ORDER BY id"
        ).fetchall()
        pooled = [r for r in rows if r[3]]
        assert len(pooled) == n and len({(r[0], r[1]) for r in pooled}) == n  # every item once
        assert all(r[2] in ("added", "duplicate") for r in rows)
        orphans = conn.execute(
            "SELECT COUNT(*) FROM icd_embeddings e JOIN icd_annotations a ON a.id = e.demo_id WHERE NOT a.in_pool"
        ).fetchone()[0]
        assert orphans == 0
        calls = conn.execute("SELECT calls FROM icd_ledger").fetchone()[0]
        # every item bought once, plus at most the one call each killed worker had in flight
        assert n <= calls <= n + killed
        leftover = conn.execute("SELECT COUNT(*) FROM icd_claims").fetchone()[0]
        assert leftover <= killed  # only claims of the killed calls, expiring on their lease
    with PostgresPool(url) as pool:
        assert len(pool) == n
        assert json.dumps(pool.stats())  # readable after the kills


class CountingTeacher:
    name = "counting"

    def __init__(self):
        from icdistill.models.reference import ReferenceTeacher

        self.inner = ReferenceTeacher()
        self.calls = 0

    def sample(self, query, n):
        self.calls += 1
        return self.inner.sample(query, n)


def test_two_runs_share_a_pool_and_buy_each_label_once(url, tmp_path):
    from fakes import FakeEmbedder, FakeStudent, colour_folder
    from icdistill.runner import Parts, RunConfig, run_icd

    root = colour_folder(tmp_path / "c", n_per_class=4)
    teachers = [CountingTeacher(), CountingTeacher()]
    summaries = []
    for k, teacher in enumerate(teachers):
        cfg = RunConfig(dataset=str(root), n=None, gate="always", pool=url, seed=k, max_calls=100)
        summaries.append(
            run_icd(cfg, tmp_path / f"run{k}", parts=Parts(FakeStudent(), teacher, FakeEmbedder()))
        )
    n = summaries[0]["n_queries"]
    assert n >= 12 and teachers[0].calls == n  # the first worker bought every label of the dataset
    # the second sees the same images in another order: every label is already in the shared pool
    assert teachers[1].calls == 0
    assert summaries[1]["n_queries"] == n and summaries[1]["pool"]["pool_size"] == n
    assert not (tmp_path / "run0" / "pool.sqlite").exists()
    assert summaries[0]["pool_location"] == url  # the summary printed a pool.sqlite that does not exist
    with PostgresPool(url) as pool:
        assert pool.ledger_state()["calls"] == n and len(pool) == n


def test_run_refuses_a_password_in_the_pool_url():
    from icdistill.runner import RunConfig

    with pytest.raises(ICDError, match="PGPASSWORD"):
        RunConfig(pool="postgresql://u:secret@127.0.0.1/db")
    with pytest.raises(ICDError, match="postgresql://"):
        RunConfig(pool="runs/other.sqlite")


def test_a_label_another_run_bought_is_a_pool_hit_not_a_teacher_call(url, tmp_path):
    """Two runs on one dataset share query ids: the second's gate must count the first's labels as
    pool hits (the shared ``q5`` is not its own crash-recovered ``q5``), per worker and globally."""
    from fakes import FakeEmbedder, FakeStudent, colour_folder
    from icdistill.runlog import read_records
    from icdistill.runner import Parts, RunConfig, run_icd

    root = colour_folder(tmp_path / "c", n_per_class=3)
    teachers = [CountingTeacher(), CountingTeacher()]
    summaries = [
        run_icd(
            RunConfig(dataset=str(root), n=None, gate="always", pool=url, seed=k),
            tmp_path / f"run{k}",
            parts=Parts(FakeStudent(), teacher, FakeEmbedder()),
        )
        for k, teacher in enumerate(teachers)
    ]
    n = summaries[0]["n_queries"]
    assert summaries[0]["teacher_calls"] == teachers[0].calls == n
    second = [r for r in read_records(tmp_path / "run1" / "log.jsonl") if r.get("event") == "query"]
    assert len(second) == n and teachers[1].calls == 0
    assert summaries[1]["teacher_calls"] == 0  # was n: each reuse counted as a recovered teacher call
    assert not any(r["teacher_asked"] for r in second)
    assert all("same image and prompt as demo" in r["gate_reason"] for r in second)
    with PostgresPool(url) as pool:
        # the global ledger and the workers' own counts agree: every label bought once
        assert pool.ledger_state()["calls"] == n == sum(s["teacher_calls"] for s in summaries)


def test_a_label_bought_while_waiting_for_its_claim_is_not_this_workers_call(url):
    import threading

    from fakes import FakeEmbedder, FakeStudent
    from icdistill.distiller import Distiller
    from icdistill.gate import AlwaysGate
    from icdistill.select import make_selector
    from icdistill.teacher import TestTimeScaling

    embedder = FakeEmbedder()
    waiting = threading.Event()

    class Watched(PostgresPool):
        def claim(self, query):
            state = super().claim(query)
            if state == "busy":
                waiting.set()
            return state

    with PostgresPool(url) as a, Watched(url) as b:
        assert a.claim(item(1)) == "claimed"  # a is buying it now
        teacher = CountingTeacher()
        d = Distiller(
            student=FakeStudent(),
            annotator=ClaimingAnnotator(TestTimeScaling(teacher), b),
            embedder=embedder,
            selector=make_selector("image"),
            gate=AlwaysGate(),
            pool=b,
        )

        def a_finishes() -> None:
            assert waiting.wait(timeout=60)  # b found the claim busy and waits for it
            e = embedder.embed_query(item(1))
            a.add(item(1), ann("a"), {**e, ANSWER: embedder.embed_texts(["a"])[0]})

        t = threading.Thread(target=a_finishes)
        t.start()
        rec = d.step(item(1, qid="b1"))  # the gate asks; the claim is busy until a's demo lands
        t.join()
        assert teacher.calls == 0 and rec["reused_demo"] is not None
        assert rec["teacher_asked"] is False and d.teacher_calls == 0 and rec["annotation"] is None
        assert "bought by another worker" in rec["gate_reason"]
        assert rec["answered_by"] == "student+new-demo" and rec["answer"] == "a"
        assert b.ledger_state()["calls"] == 1  # a's purchase only
        assert b.stats()["duplicate"] == 0  # the reuse stores nothing


def test_a_dropped_listener_reconnects_and_catches_up_by_id(url):
    import psycopg

    with (
        PostgresPool(url) as a,
        PostgresPool(url, catchup_s=3600) as b,
    ):  # no periodic check: the drop must be noticed
        a.add(item(1), ann(), emb(1))
        wait_for(lambda: len(b) == 1, "q1 seen by b")
        with psycopg.connect(url, autocommit=True) as admin:
            pids = [b._listen.info.backend_pid, b._db.info.backend_pid]  # both, as a server restart would
            for pid in pids:
                assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
            # wait for the backends to be gone before the next demo, so its notification is lost
            while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchone():
                time.sleep(0.01)
        a.add(item(2), ann(), emb(2))  # announced while b has no listener
        wait_for(lambda: len(b) == 2, "q2 caught up by b")
        assert b.reconnects == 1
        assert b.search(IMAGE, emb(2)[IMAGE], 1)[0].size == 1
        a.add(item(3), ann(), emb(3))  # and the new listener hears what comes next
        wait_for(lambda: len(b) == 3, "q3 heard by b's new listener")
        assert b.reconnects == 1
        assert sorted(d.query_id for d in b.demos()) == ["q1", "q2", "q3"]


def test_a_spent_shared_budget_is_no_call_and_no_teacher_failure(url, tmp_path):
    """A worker whose own count is under --max-calls while the pool's global cap is spent: the refusals
    are not teacher failures (the run must not stop as if the teacher were down) nor calls of its own."""
    from fakes import FakeEmbedder, FakeStudent, colour_folder
    from icdistill.runlog import read_records
    from icdistill.runner import Parts, RunConfig, run_icd

    teachers = [CountingTeacher(), CountingTeacher()]
    summaries = []
    for k, teacher in enumerate(teachers):  # other images for each worker: nothing to reuse
        root = colour_folder(tmp_path / f"c{k}", n_per_class=3, seed=k)
        cfg = RunConfig(dataset=str(root), n=None, gate="always", pool=url, seed=k, max_calls=3)
        summaries.append(
            run_icd(cfg, tmp_path / f"run{k}", parts=Parts(FakeStudent(), teacher, FakeEmbedder()))
        )
    assert teachers[0].calls == 3 and teachers[1].calls == 0
    # before: each refusal counted as this worker's call (3, then its own cap held it back) and as a
    # teacher failure (10 of those in a row stop a run as if the teacher were down)
    assert summaries[1]["n_queries"] == 12 and summaries[1]["teacher_calls"] == 0
    second = [r for r in read_records(tmp_path / "run1" / "log.jsonl") if r.get("event") == "query"]
    assert all(not r["teacher_asked"] and r["teacher_error"] is None for r in second)
    assert all("budget is spent" in r["gate_reason"] for r in second)
    with PostgresPool(url) as pool:
        assert pool.ledger_state()["calls"] == 3


def test_a_change_whose_notification_never_came_is_caught_up_by_id(url):
    """A silent drop (a notification lost without an error): the periodic id check finds it."""
    import psycopg

    with PostgresPool(url) as a, PostgresPool(url, catchup_s=0.2) as b:
        for i in range(3):
            a.add(item(i), ann(), emb(i))
        wait_for(lambda: len(b) == 3, "a's demos seen by b")  # notifications arrive a moment after commit
        with psycopg.connect(url, autocommit=True) as admin:  # changes nobody announces
            admin.execute("UPDATE icd_annotations SET in_pool = false WHERE query_id = 'q0'")
        wait_for(lambda: sorted(d.query_id for d in b.demos()) == ["q1", "q2"], "the next id check")
        assert b.search(IMAGE, emb(0)[IMAGE], 3)[0].size == 2 and b.reconnects == 0


def test_a_claim_racing_the_claimants_commit_finds_the_demo(url):
    """b looks for a pooled demo (none yet), then a commits its demo and drops its claim, then b's
    claim insert goes through: b must see the demo and not buy the label again."""
    import threading

    from icdistill.types import image_digest

    with PostgresPool(url) as a, PostgresPool(url) as b:
        assert a.claim(item(1)) == "claimed"
        written, commit = threading.Event(), threading.Event()

        def a_commits_late() -> None:
            with a._db.transaction():  # a's demo and the release of its claim, not committed yet
                a._add_once(item(1), ann(), emb(1), image_digest(item(1).image), "added")
                written.set()
                assert commit.wait(timeout=60)

        ta = threading.Thread(target=a_commits_late)
        ta.start()
        assert written.wait(timeout=60)
        got: list[str] = []
        tb = threading.Thread(target=lambda: got.append(b.claim(item(1, qid="b1"))))
        tb.start()
        wait_until_lock_waiting(url, b)  # b saw no demo and waits on a's claim row
        commit.set()
        ta.join()
        tb.join()
        assert got == ["pooled"]  # was "claimed": a second purchase of a label just bought
        assert b.ledger_state()["calls"] == 1
        assert b.claim(item(1, qid="b2")) == "pooled"


def test_a_twin_query_of_the_same_worker_waits_for_its_claim(url):
    """A service answers queries concurrently under one worker id: a second query of an item that
    worker is buying now must wait for that label, not buy it again."""
    with PostgresPool(url) as a:
        assert a.claim(item(1)) == "claimed"
        assert a.claim(item(1, qid="twin")) == "busy"  # was "claimed": one label bought twice
        a.release(item(1, qid="twin"))  # the twin's release leaves the claim in flight alone
        assert a.claim(item(1, qid="twin")) == "busy"
        a.release(item(1))
        assert a.claim(item(1, qid="twin")) == "claimed"
        assert a.ledger_state()["calls"] == 2


def test_a_teacher_call_longer_than_the_lease_keeps_its_claim(url):
    """An icd run worker renews its claim while its teacher call runs: a slow call (test-time
    scaling, retries) must not let another worker buy the same label once the lease has passed."""
    import psycopg

    seen: list[str] = []
    with PostgresPool(url, lease_s=1.0) as a, PostgresPool(url, lease_s=1.0) as b:

        class SlowerThanTheLease:
            def annotate(self, query):
                with psycopg.connect(url, autocommit=True) as admin:
                    (taken_until,) = admin.execute("SELECT expires FROM icd_claims").fetchone()
                while time.time() < taken_until + 0.2:  # the lease the claim was taken with is over
                    time.sleep(0.02)
                seen.append(b.claim(item(1, qid="b1")))
                return ann("a")

        ClaimingAnnotator(SlowerThanTheLease(), a).annotate(item(1))
        assert seen == ["busy"]  # was "claimed": b bought the label a was still buying
        assert a.ledger_state()["calls"] == 1


def test_a_demo_committed_while_a_worker_loads_the_pool_is_searchable(url):
    """A worker joining a pool in use reads vectors and demos: a demo committed between the two reads
    must not be loaded half (no vectors, its notification then skipped as already known)."""
    with PostgresPool(url) as a:
        a.add(item(1), ann(), emb(1))

        class JoinsWhileAWrites(PostgresPool):
            def _load(self) -> None:
                real = self._db

                class Connection:  # the real connection; another worker commits before the demo read
                    def __getattr__(self, name):
                        return getattr(real, name)

                    def execute(self, sql, *args):
                        if sql.startswith("SELECT id, query_id") and len(a) == 1:
                            a.add(item(2), ann(), emb(2))
                        return real.execute(sql, *args)

                self._db = Connection()
                try:
                    super()._load()
                finally:
                    self._db = real

        with JoinsWhileAWrites(url) as b:
            assert len(a) == 2
            wait_for(lambda: len(b) == 2, "q2 seen by b")
            assert sorted(d.query_id for d in b.demos()) == ["q1", "q2"]
            found = [b.get(i) for i in b.search(IMAGE, emb(2)[IMAGE], 1)[0].tolist()]
            assert [d.query_id for d in found] == ["q2"]  # was ["q1"]: q2 loaded without its vectors
            assert set(found[0].embeddings) == {IMAGE, ANSWER}


def test_renewing_only_the_claims_in_flight_lets_a_leaked_one_lapse(url):
    # waits for the lapse itself (b's claim going through), not a sleep just over the lease: a 0.3 s
    # lease and a 0.4 s sleep failed with other jobs on the cores
    lease = 2.0  # the longest pause between two statements of this test that it survives
    with PostgresPool(url, lease_s=lease) as a, PostgresPool(url) as b:
        assert a.claim(item(1)) == "claimed" and a.claim(item(2)) == "claimed"
        assert a.renew_claims(["q1"]) == 1  # q2's release failed: nobody works on it any more
        assert a.renew_claims() == 2  # a run worker renews all of its claims
        deadline = time.monotonic() + 120
        while True:
            assert a.renew_claims(["q1"]) == 1  # the call in flight keeps its claim
            got = b.claim(item(2, qid="b2"))
            if got == "claimed":  # q2's lease, renewed last by the renewal of all, ran out
                break
            assert got == "busy" and time.monotonic() < deadline, got
            time.sleep(0.05)
        assert a.renew_claims(["q1"]) == 1
        assert b.claim(item(1, qid="b1")) == "busy"


def test_a_pool_made_before_owners_is_migrated(url):
    import psycopg

    with PostgresPool(url) as old:
        old.add(item(1), ann("b"), emb(1))
    with psycopg.connect(url, autocommit=True) as admin:  # back to the schema before owners
        admin.execute("DROP INDEX icd_one_query_per_owner")
        admin.execute("ALTER TABLE icd_annotations DROP COLUMN owner")
        admin.execute(
            "ALTER TABLE icd_annotations ADD CONSTRAINT icd_annotations_query_id_key UNIQUE (query_id)"
        )
    with PostgresPool(url, owner="run:b") as b:
        assert len(b) == 1 and b.annotation_for("q1") is None  # the old q1 is not this run's
        assert b.add(item(2, qid="q1"), ann(), emb(2))[1] == "added"  # same id, another owner
        assert b.annotation_for("q1").answer == "a"
    with PostgresPool(url) as default:
        assert default.annotation_for("q1").answer == "b"  # the old ids are the default owner's
        assert len(default) == 2


def test_a_pool_that_cannot_be_set_up_is_a_clear_error_and_holds_no_connection(cluster, url):
    """A role that may not create the tables (PostgreSQL 15: nobody but the owner creates in public):
    a clear error, not a raw driver error, and no backend left open by the half-opened pool/store."""
    import psycopg

    from icdistill.service.store_pg import PostgresServiceStore

    with psycopg.connect(cluster, autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS icd_reader")
        admin.execute("CREATE ROLE icd_reader LOGIN")
        reader = url.replace("postgres@", "icd_reader@")
        with pytest.raises(ICDError, match="cannot open pool") as pool_error:
            PostgresPool(reader)
        with pytest.raises(ICDError, match="cannot open the service store") as store_error:
            PostgresServiceStore(reader, "w", 1.0)
        assert "permission denied" in str(pool_error.value) + str(store_error.value)
        deadline = time.monotonic() + 10
        while admin.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE usename = 'icd_reader'").fetchone()[
            0
        ]:
            assert time.monotonic() < deadline, "a half-opened pool or store kept its connections"
            time.sleep(0.05)
        del pool_error, store_error


def test_a_call_charged_while_another_workers_claim_commits_counts_that_claim(url):
    """Two workers charging at once: b's charge waits on the ledger row a is charging, and must then
    count a's claim (a call in flight). The charge counted the claims as of b's statement start, so
    both went ahead and the dollar cap was overspent by a reserved call."""
    import threading

    import psycopg

    with PostgresPool(url, max_cost_usd=1.0) as a, PostgresPool(url) as b:
        assert a.claim(item(0)) == "claimed"
        a.add(item(0), ann(cost=0.3), emb(0))  # 0.3 paid: the dearest call
        assert a.claim(item(1)) == "claimed"  # in flight: 0.3 + 0.3 x 1
        with psycopg.connect(url, autocommit=True) as other, other.transaction():
            # another worker mid-claim: its claim inserted and the ledger row charged, not committed
            other.execute(
                "INSERT INTO icd_claims (image_digest, prompt, query_id, worker, expires) "
                "VALUES ('d', 'what?', 'o1', 'other', %s)",
                (time.time() + 600,),
            )
            other.execute("UPDATE icd_ledger SET calls = calls + 1 WHERE name = 'default'")
            got: list[str] = []
            tb = threading.Thread(target=lambda: got.append(b.claim(item(2))))
            tb.start()
            wait_until_lock_waiting(url, b)  # b waits on the ledger row
        tb.join()
        # 0.3 paid + 0.3 x (a's call + the other's + b's) = 1.2 > 1.0; was "claimed" (0.9)
        assert got == ["budget"]


def test_a_closed_pools_demo_image_is_a_clear_error_and_opens_no_connection(url):
    """Reading a demo's image after its pool closed reconnected (a closed connection reads as a lost
    one) and left that backend open for good."""
    import psycopg

    with PostgresPool(url) as a:
        a.add(item(3), ann(), emb(3))
    b = PostgresPool(url)
    demo = b.demos()[0]
    assert demo.image.tobytes() == item(3).image.tobytes()  # b's image reader is open
    b.close()
    b.images.cache.clear()
    with pytest.raises(ICDError, match=rf"cannot read the image of demo {demo.id} from pool"):
        _ = demo.image
    with psycopg.connect(url, autocommit=True) as admin:  # closed backends leave within moments
        deadline = time.monotonic() + 10
        while admin.execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]:
            assert time.monotonic() < deadline, "a closed pool holds a connection"
            time.sleep(0.05)


def test_a_text_only_call_in_flight_is_reserved_for_every_worker(url):
    """A query without an image holds no image claim, so its call in flight was invisible to the
    other workers' dollar checks: any number of them went ahead past the cap."""
    text = [Query(id=f"t{i}", image=None, prompt="p") for i in range(4)]
    with PostgresPool(url, max_cost_usd=1.0) as a, PostgresPool(url) as b:
        assert a.claim(item(0)) == "claimed"
        a.add(item(0), ann(cost=0.3), emb(0))  # 0.3 paid: the dearest call
        assert a.claim(text[0]) == "claimed"  # 0.3 + 0.3 x 1
        assert a.claim(text[1]) == "claimed"  # 0.3 + 0.3 x 2
        assert b.claim(text[2]) == "budget"  # 0.3 + 0.3 x 3 > 1.0; was "claimed" (a's unseen)
        a.release(text[1])  # that call failed: nothing reserved for it any more
        assert b.claim(text[2]) == "claimed"  # 0.3 + 0.3 x 2
        a.add(text[0], ann(cost=0.05), {ANSWER: emb(1)[ANSWER]})  # landed: 0.35 paid, b's in flight
        assert a.claim(text[3]) == "claimed"  # 0.35 + 0.3 x 2
        assert b.claim(item(5)) == "budget"  # 0.35 + 0.3 x 3 > 1.0
        assert b.ledger_state()["cost_usd"] == pytest.approx(0.35)


def test_values_shared_between_demos_do_not_outlive_them_without_bound(url, monkeypatch):
    """Each demo another worker adds brings its prompt, answer and votes into the pool's table of
    shared values; with unique prompts and evictions that table grew for as long as the worker ran."""
    import icdistill.pool.demos

    monkeypatch.setattr(icdistill.pool.demos, "SHARED_VALUES_MAX", 16)
    with PostgresPool(url, max_size=3) as a, PostgresPool(url) as b:
        for i in range(40):
            a.add(Query(id=f"u{i}", image=None, prompt=f"question {i}?"), ann(f"answer {i}"), emb(i))
            # b has a's demo when its notification arrives, not at a's commit (was read at once); and
            # past 3 demos the size alone says nothing: wait for this demo itself
            wait_for(lambda i=i: f"question {i}?" in {d.prompt for d in b.demos()}, f"demo u{i} in b")
            assert len(b) == min(i + 1, 3)
        assert len(b._shared) <= 16
        assert sorted(d.prompt for d in b.demos()) == ["question 37?", "question 38?", "question 39?"]


@pytest.fixture()
def own_cluster():
    """A cluster of this test's own (it is restarted under running workers)."""
    from pg_cluster import fresh_database, throwaway_cluster

    with throwaway_cluster() as admin:
        yield fresh_database(admin, "restarted")


def test_workers_survive_database_restarts_losing_nothing_and_buying_nothing_twice(own_cluster, tmp_path):
    """``pg_ctl -m fast restart`` under running workers ended every one of them (a one-line error from
    ``add``, a traceback from ``annotation_for``). They reconnect and retry now: restarted three times,
    every worker finishes, every item is pooled once and bought once, and nobody prints a traceback."""
    import psycopg

    from pg_cluster import restart_cluster

    url, n = own_cluster, 60
    script = tmp_path / "worker.py"
    # a lease longer than a restart: this test is about restarts, not about dead workers' claims
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), url=url, n=n, lease_s=120.0))
    PostgresPool(url).close()  # the schema, before anyone polls it
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), f"w{k}", str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for k in range(3)
    ]

    def stored() -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM icd_annotations").fetchone()[0])

    def connected() -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            return int(
                conn.execute(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()[0]
            )

    # every worker connected before the first restart (a pool's first connection is not retried)
    wait_for(lambda: connected() >= 6 or any(w.poll() is not None for w in workers), "3 workers connected")
    restarts = 0
    for threshold in (10, 25, 40):  # of ~60 rows (a pooled item is skipped): restarts mid-work
        wait_for(lambda t=threshold: stored() >= t or all(w.poll() is not None for w in workers), f"{threshold} rows")
        if all(w.poll() is not None for w in workers):
            break
        restart_cluster(url)
        restarts += 1
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (_out, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, err
        assert "Traceback" not in err
    assert restarts == 3, "the workers finished before the restarts: give them more work"
    calls = sum(int(out.split("teacher_calls=")[1]) for out, _ in outputs)
    with psycopg.connect(url, autocommit=True) as conn:
        pooled = conn.execute("SELECT image_digest, prompt FROM icd_annotations WHERE in_pool").fetchall()
        ledger = conn.execute("SELECT calls FROM icd_ledger").fetchone()[0]
        claims = conn.execute("SELECT COUNT(*) FROM icd_claims").fetchone()[0]
    assert len(pooled) == len(set(pooled)) == n  # nothing lost
    assert calls == n  # nothing bought twice
    # a claim whose commit landed while its reply was lost is charged again on retry: at most one
    # such call per restart, in the ledger only (the teacher was called once)
    assert n <= ledger <= n + restarts and claims == 0


def test_a_lost_database_is_retried_then_a_one_line_resumable_error(own_cluster):
    from icdistill.errors import PoolUnavailable
    from pg_cluster import pg_ctl_cluster

    with PostgresPool(own_cluster, reconnect_s=1.0) as pool:
        pool.add(item(1), ann(), emb(1))
        pg_ctl_cluster(own_cluster, "-m", "fast", "-w", "stop")
        with pytest.raises(PoolUnavailable, match=r"for 1 s while reading the ledger .*resume once") as e:
            pool.ledger_state()
        assert "\n" not in str(e.value)
        pg_ctl_cluster(own_cluster, "-w", "start")
        assert pool.ledger_state()["calls"] == 0 and pool.stats()["added"] == 1  # and it is back


def test_a_resumed_worker_takes_over_its_dead_predecessors_claims_at_once(url, tmp_path):
    """Claims are keyed by worker (host:pid:random): a resumed run waited out its own killed process's
    lease (~54 s), then bought the item again. Holding the run folder's lock proves the predecessor
    dead: its claims are the successor's at once, and still nobody else's."""
    from icdistill.runner import RunConfig, open_pool

    out = tmp_path / "run"
    out.mkdir()
    cfg = RunConfig(pool=url)
    with open_pool(cfg, out) as first:  # then killed mid-call: its claims stay for the lease (600 s)
        first.lease_s = 600.0
        assert first.claim(item(1)) == "claimed"
        assert first.claim(Query(id="t", image=None, prompt="p")) == "claimed"  # a text-only call
    with PostgresPool(url, owner="another run") as other:
        assert other.claim(item(1, qid="o1")) == "busy"
        with open_pool(cfg, out) as resumed:  # the runner holds the folder's lock when it opens it
            assert resumed.worker != first.worker
            assert resumed.claim(item(1)) == "claimed"  # was "busy" until the lease ran out
            assert other.claim(item(1, qid="o1")) == "busy"  # taken over, not released
            assert resumed.ledger_state()["calls"] == 3  # the dead calls, and this one
            # the dead text-only call reserves nothing any more: only the image claim is left
            assert resumed.renew_claims() == 1
        # a pool of the same owner without the lock takes nothing over
        with PostgresPool(url, owner=resumed.owner) as unlocked:
            assert unlocked.claim(item(1)) == "busy"


def test_a_busy_claim_is_waited_for_by_listen_not_by_polling(url):
    """A worker waiting for another's claim polled every 50 ms (14 commits/s from one waiter): it now
    sleeps on LISTEN until that claim is deleted, and other items' commits do not wake it."""
    import threading

    attempts: list[str] = []

    class Counted(PostgresPool):
        def claim(self, query):
            attempts.append(state := super().claim(query))
            return state

    with PostgresPool(url, lease_s=600) as a, Counted(url, lease_s=600) as b:
        assert a.claim(item(1)) == "claimed"
        teacher = SlowTeacher()
        t = threading.Thread(target=lambda: ClaimingAnnotator(teacher, b, recheck_s=600).annotate(item(1, "b1")))
        t.start()
        wait_for(lambda: attempts == ["busy"], "b finds the claim busy")
        for i in range(2, 7):  # five other items committed: their claims' notifications reach b
            a.add(item(i), ann(), emb(i))
        wait_for(lambda: len(b._pending[0]) >= 5, "b's waiter reads the other items' notifications")
        assert attempts == ["busy"]  # and went on waiting without a query
        a.release(item(1))  # a's teacher failed: b is woken and buys it
        t.join(timeout=300)
        assert not t.is_alive() and attempts == ["busy", "claimed"] and teacher.calls == 1


def test_leases_run_on_the_database_clock(url, monkeypatch):
    """A worker whose clock is an hour slow wrote claims that had expired already for everyone else:
    another worker bought the same label at once."""
    with PostgresPool(url, lease_s=60) as a, PostgresPool(url, lease_s=60) as b:
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 3600)  # a's host clock
        assert a.claim(item(1)) == "claimed"
        assert a.renew_claims() == 1
        monkeypatch.setattr(time, "time", real)
        assert b.claim(item(1, "b1")) == "busy"  # was "claimed": a label bought twice


def test_a_hung_statement_is_an_error_not_a_hang(url):
    """Every connection has a statement timeout and TCP keepalives: a lock held forever (a hung peer)
    ends the statement with a clear error."""
    import psycopg

    with PostgresPool(url, statement_timeout_s=0.5) as pool, psycopg.connect(url) as admin:
        params = pool._db.info.get_parameters()
        assert params["keepalives"] == "1" and int(params["keepalives_idle"]) > 0
        assert pool._db.execute("SHOW statement_timeout").fetchone()[0] == "500ms"
        admin.execute("SELECT 1 FROM icd_ledger FOR UPDATE")  # held, never committed
        with pytest.raises(ICDError, match="claiming an item failed: canceling statement due to statement timeout"):
            pool.claim(item(1))
        admin.rollback()
        assert pool.claim(item(1)) == "claimed"  # the connection is still good


def test_a_busy_pools_refresh_applies_notifications_without_re_reading_every_id(url):
    """The count check compared the database with our copy before applying the notifications just
    read: in a busy pool nearly every check re-read every pooled id (3-4 s and 68 MB at 1M demos)."""
    with PostgresPool(url) as a, PostgresPool(url, catchup_s=0) as b:  # a check on every read
        for i in range(20):
            a.add(item(i), ann(), emb(i))
            assert len(b) == i + 1  # the check brings the notification of what it counts
        assert b.full_catchups == 0  # was 20 of 20
        assert b.search(IMAGE, emb(7)[IMAGE], 1)[0].size == 1


def test_a_worker_holds_two_connections(url):
    """The image reader and the claims' heartbeat had a connection each (3-4 per worker, ~25 workers
    on the default max_connections): they share the listener now."""
    import psycopg

    with PostgresPool(url) as a:
        a.add(item(1), ann(), emb(1))
    with PostgresPool(url) as b, psycopg.connect(url, autocommit=True) as admin:
        assert b.demos()[0].image.tobytes() == item(1).image.tobytes()  # an image read
        assert b.claim(item(2)) == "claimed" and b.renew_claims() == 1  # a heartbeat
        n = admin.execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]
        assert n == 2
