"""A separate session-mode URL for the pool's listener (issue 18): ordinary queries may go through a
transaction-mode PgBouncer while LISTEN keeps a session of its own."""

from __future__ import annotations

import pytest

from fakes import wait_for

psycopg = pytest.importorskip("psycopg")

from test_pool_pg import ann, emb, item  # noqa: E402

from icdistill.errors import ICDError  # noqa: E402
from icdistill.pool import PostgresPool  # noqa: E402


def test_the_listener_uses_its_own_url_and_notifications_still_arrive(url):
    listen = url + "?application_name=icd-listen"
    with PostgresPool(url, listen_url=listen) as a, PostgresPool(url) as b:
        with psycopg.connect(url, autocommit=True) as admin:
            names = dict(
                admin.execute(
                    "SELECT pid, application_name FROM pg_stat_activity WHERE pid = ANY(%s)",
                    ([a._db.info.backend_pid, a._listen.info.backend_pid],),
                ).fetchall()
            )
        assert names[a._listen.info.backend_pid] == "icd-listen"
        assert names[a._db.info.backend_pid] != "icd-listen"
        assert a._db.prepare_threshold is None  # no prepared statements through a transaction pooler
        b.add(item(1), ann(), emb(1))
        wait_for(lambda: len(a) == 1, "the other worker's demo, by LISTEN on the listener's URL")
        a._listen.close()  # a lost listener reconnects to its own URL
        b.add(item(2), ann(), emb(2))
        wait_for(lambda: len(a) == 2, "a demo after the listener reconnected")
        assert a._listen.info.dsn.find("application_name=icd-listen") >= 0


def test_a_listen_url_of_another_database_is_refused_at_open(url, cluster):
    """The listener also reads images and renews claims: pointed at another database it would
    silently serve them from there. Refused at open, with the setting's name, leaving no backend."""
    from pg_cluster import fresh_database

    other_name = url.rsplit("/", 1)[1] + "_other"
    other = fresh_database(cluster, other_name)
    with pytest.raises(ICDError, match="ICD_POOL_LISTEN_URL reaches another database"):
        PostgresPool(url, listen_url=other)

    def backends_on_other() -> int:  # only the refused listener ever connected there
        with psycopg.connect(url, autocommit=True) as admin:
            sql = "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s"
            return int(admin.execute(sql, (other_name,)).fetchone()[0])

    wait_for(lambda: backends_on_other() == 0, "the refused listener's backend to end")
    with PostgresPool(url, listen_url=url + "?application_name=same") as pool:  # the same database: fine
        assert len(pool) == 0
