"""The service's PostgreSQL store under database restarts (issue 18): it reconnects with bounded
backoff and runs the failed statement or transaction again, as the pool does."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from fakes import wait_for

pytest.importorskip("psycopg")

from icdistill.errors import DatabaseUnavailable  # noqa: E402
from icdistill.service.store import ANNOTATED, PENDING_TEACHER  # noqa: E402
from icdistill.service.store_pg import PostgresServiceStore  # noqa: E402


@pytest.fixture()
def own_cluster():
    """A cluster of this test's own (it is restarted under a running store)."""
    from pg_cluster import fresh_database, throwaway_cluster

    with throwaway_cluster() as admin:
        yield fresh_database(admin, "restarted")


def query_row(qid: str, position: int) -> dict[str, Any]:
    return {
        "query_id": qid,
        "position": position,
        "prompt": "what?",
        "options": ["a", "b"],
        "state": PENDING_TEACHER,
        "answer": "a",
        "uncertainty": 0.5,
        "teacher_asked": True,
        "gate_reason": "budget",
        "ctx_teacher_calls": 0,
        "ctx_pool_size": 0,
        "demo_ids": [],
    }


def test_a_running_service_store_survives_database_restarts(own_cluster):
    """``pg_ctl -m fast restart`` twice under a loop that takes positions, stores, closes, renews and
    reads queries (a service's work): nothing fails, nothing is lost or stored twice."""
    from pg_cluster import restart_cluster

    store = PostgresServiceStore(own_cluster, "server-1", lease_s=60.0)
    done: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:
        i = 0
        while not stop.is_set():
            qid = f"q{i}"
            try:
                pos, _calls = store.take_slot()
                store.add_query(query_row(qid, pos), teacher="t")
                store.heartbeat([qid])
                assert store.read(qid)["state"] == PENDING_TEACHER  # type: ignore[index]
                assert store.finish_query(
                    qid,
                    state=ANNOTATED,
                    teacher_answer="a",
                    final_answer="a",
                    answered_by="teacher",
                    pool_status="added",
                    error=None,
                    calls=1,
                    cost_usd=0.0,
                )
                assert store.get(qid)["state"] == ANNOTATED  # type: ignore[index]
                store.counts()
            except BaseException as e:  # noqa: BLE001 - the test reports it
                errors.append(e)
                return
            done.append(qid)
            i += 1

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        for _restart in range(2):
            seen = len(done)
            wait_for(lambda s=seen: len(done) >= s + 5 or bool(errors), "queries before a restart")
            restart_cluster(own_cluster)
        seen = len(done)
        wait_for(lambda s=seen: len(done) >= s + 5 or bool(errors), "queries after the restarts")
    finally:
        stop.set()
        t.join(timeout=300)
    assert not errors, repr(errors[0])
    assert store.reconnects >= 2
    counts = store.counts()
    assert counts[ANNOTATED] == len(done) and counts[PENDING_TEACHER] <= 1
    ledger = store.ledger_totals()
    assert ledger["teacher_calls"] == counts[ANNOTATED] + counts[PENDING_TEACHER] and ledger["paid"] == len(done)
    store.close()


def test_a_lost_database_is_a_one_line_error_after_the_retry_window(own_cluster):
    from pg_cluster import pg_ctl_cluster

    store = PostgresServiceStore(own_cluster, "server-1", lease_s=60.0, reconnect_s=1.0)
    pg_ctl_cluster(own_cluster, "-m", "fast", "-w", "stop")
    with pytest.raises(DatabaseUnavailable, match=r"for 1 s while counting queries") as e:
        store.counts()
    assert "\n" not in str(e.value)
    pg_ctl_cluster(own_cluster, "-w", "start")
    assert store.counts()[ANNOTATED] == 0  # and it is back
    store.close()


def test_an_attempt_whose_commit_landed_before_the_connection_dropped_is_counted_once(url):
    """``count_attempt`` is run again after a lost connection: an increment that committed before the
    reply was lost must not be counted twice (it would charge a phantom teacher attempt)."""
    import contextlib

    import psycopg

    store = PostgresServiceStore(url, "w1", 60.0, reconnect_s=30)
    try:
        store.add_query(query_row("q1", store.take_slot()[0]), "t")
        real = store._main._conn
        dropped: list[bool] = []

        class DropsAfterCommit:
            """The connection, which closes right after its first transaction committed."""

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            @contextlib.contextmanager
            def transaction(self) -> Any:
                with real.transaction():
                    yield
                if not dropped:
                    dropped.append(True)
                    real.close()
                    raise psycopg.OperationalError("server closed the connection unexpectedly")

        store._main._conn = DropsAfterCommit()
        store.count_attempt("q1")
        assert dropped == [True]
        assert store.get("q1")["attempts"] == 1
        store.count_attempt("q1")  # and the next one counts as usual, on the new connection
        assert store.get("q1")["attempts"] == 2
    finally:
        store.close()
