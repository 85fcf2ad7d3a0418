"""Several `icd serve` processes on one PostgreSQL database (a throwaway Debian cluster): one pool, one
labelling queue, one global budget. Real HTTP on 127.0.0.1; the teacher is `serve-model` (an
OpenAI-compatible server on 127.0.0.1) that counts the requests it gets from every server."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("psycopg")
import psycopg  # noqa: E402

from fakes import ColourStudent, LocalServer  # noqa: E402
from icdistill.serve_model import FaultPlan, create_app  # noqa: E402
from pg_cluster import free_port  # noqa: E402
from service_helpers import AUTH, KEY, OPTIONS, b64, colour_png, query_json, running_service, wait_until  # noqa: E402

HERE = Path(__file__).parents[1]  # the tests folder, where service_server.py is


class Server:
    """`icd serve` in its own process (tests/service_server.py: fake student and embedder)."""

    def __init__(self, pool: str, teacher: str, log: Any, max_calls: int = 100, lease_s: float = 1.0) -> None:
        port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "service_server.py"), pool, str(port), teacher, str(max_calls), str(lease_s)],
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.url = f"http://127.0.0.1:{port}"

    def wait_up(self) -> Server:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode}")
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=90)
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def servers(n: int, pool: str, teacher: str, log: Any, **kw: Any) -> list[Server]:
    started = [Server(pool, teacher, log, **kw) for _ in range(n)]  # boot side by side
    return [s.wait_up() for s in started]


def teacher_spec(url: str) -> str:
    return f"openai:colour-expert@{url}/v1?timeout=30&retries=2&backoff=0.02&cache=0"


def sql(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, args).fetchall()


def test_two_servers_buy_a_label_once_share_demos_and_one_budget(url, tmp_path):
    teacher_app = create_app(ColourStudent(), FaultPlan())
    log = open(tmp_path / "servers.log", "ab")  # noqa: SIM115 - shared by the servers
    with LocalServer(teacher_app) as turl:
        a, b = servers(2, url, teacher_spec(turl), log, max_calls=4, lease_s=10.0)
        try:
            with httpx.Client(headers=AUTH, timeout=60) as c:
                # the same image posted to both servers at once: the teacher is called once
                body = query_json("red", seed=1, label="red", wait=True)
                with ThreadPoolExecutor(2) as ex:
                    ra, rb = ex.map(lambda s: c.post(s.url + "/v1/predict", json=body).json(), (a, b))
                assert teacher_app.state.requests == 1
                statuses = sorted(str(r.get("pool_status")) for r in (ra, rb))
                # the other server reused the label (it waited for the claim) or never asked (already pooled)
                assert statuses in (["None", "added"], ["added", "reused"]), (ra, rb)
                assert all(r["answer"] == "red" for r in (ra, rb))
                assert [c.get(s.url + "/v1/demos").json()["total"] for s in (a, b)] == [1, 1]

                # a demo added on one server is in the other's pool within a second
                demo = {"image_b64": b64(colour_png("blue", 7)), "prompt": "What colour is it?", "label": "blue"}
                assert c.post(a.url + "/v1/demos", json={**demo, "options": OPTIONS}).status_code == 201
                deadline = time.monotonic() + 1.0
                while c.get(b.url + "/v1/demos").json()["total"] < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert c.get(b.url + "/v1/demos").json()["total"] == 2

                # one budget for both: at most 4 teacher calls in all, however the requests are spread
                jobs = [(s, OPTIONS[i % 4], 100 + i) for i, s in zip(range(10), itertools.cycle((a, b)), strict=False)]
                with ThreadPoolExecutor(6) as ex:
                    done = list(
                        ex.map(
                            lambda j: c.post(j[0].url + "/v1/predict", json=query_json(j[1], j[2], label=j[1], wait=True)).json(),
                            jobs,
                        )
                    )
                assert all(r.get("state") in ("answered", "annotated", "failed") for r in done), done
                calls, cap = sql(url, "SELECT calls, max_calls FROM icd_ledger")[0]
                assert cap == 4 and calls <= 4
                assert teacher_app.state.requests == calls  # every bought label was one request, none twice
                bought = [r for r in done if r.get("pool_status") == "added"]
                assert len(bought) == calls - 1  # the rest were held back by the shared budget
                assert sum(r["state"] == "answered" or r["state"] == "failed" for r in done) >= 10 - 3
                # both servers report the global spend and stream (their stats sync every sweep)
                wait_until(
                    lambda: [
                        (st["budget"]["pool_ledger"]["calls"], st["queries"], st["pool_size"])
                        for st in (c.get(s.url + "/v1/stats").json() for s in (a, b))
                    ]
                    == [(calls, 12, calls + 1)] * 2
                )
        finally:
            for s in (a, b):
                s.kill()
            log.close()


def test_a_server_killed_mid_call_loses_nothing_and_another_finishes_its_work(url, tmp_path):
    # the first and third teacher requests hang for 8 s: the calls the kills interrupt
    teacher_app = create_app(ColourStudent(), FaultPlan.parse("slow:8,slow:0,slow:8"))
    log = open(tmp_path / "servers.log", "ab")  # noqa: SIM115
    with LocalServer(teacher_app) as turl:
        spec = teacher_spec(turl)
        a, b = servers(2, url, spec, log, lease_s=2.0)
        restarted: Server | None = None
        try:
            with httpx.Client(headers=AUTH, timeout=60) as c:
                ack = c.post(a.url + "/v1/predict", json=query_json("green", 3, label="green")).json()
                assert ack["state"] == "pending_teacher"  # acknowledged: it must not be lost
                wait_until(lambda: teacher_app.state.requests >= 1)  # a's teacher call is in flight
                a.kill()
                # b adopts the silent server's work when its lease runs out, and buys the label
                done = wait_until(
                    lambda: (q := c.get(f"{b.url}/v1/queries/{ack['query_id']}").json())["state"] == "annotated" and q,
                    timeout=60,
                )
                assert done["teacher_answer"] == "green" and done["pool_status"] == "added"

                # and a restarted server finishes the work of one killed mid-call when no other is up
                ack2 = c.post(b.url + "/v1/predict", json=query_json("yellow", 4, label="yellow")).json()
                assert ack2["state"] == "pending_teacher"
                wait_until(lambda: teacher_app.state.requests >= 3)  # b's call hangs on the third request
                b.kill()
                (restarted,) = servers(1, url, spec, log, lease_s=2.0)
                done2 = wait_until(
                    lambda: (q := c.get(f"{restarted.url}/v1/queries/{ack2['query_id']}").json())["state"]
                    == "annotated"
                    and q,
                    timeout=60,
                )
                assert done2["teacher_answer"] == "yellow" and done2["pool_status"] == "added"
                stats = c.get(restarted.url + "/v1/stats").json()
                assert stats["pending"] == 0 and stats["queries"] == 2
        finally:
            for s in (a, b, restarted):
                if s is not None:
                    s.kill()
            log.close()
    # each query is one whole demo: its annotation, its embeddings, no claim left behind
    for ack_id in (ack["query_id"], ack2["query_id"]):
        (row,) = sql(url, "SELECT id, in_pool, status FROM icd_annotations WHERE query_id = %s", ack_id)
        assert row[1] is True and row[2] == "added"
        assert sql(url, "SELECT COUNT(*) FROM icd_embeddings WHERE demo_id = %s", row[0])[0][0] >= 2
    assert sql(url, "SELECT COUNT(*) FROM icd_annotations")[0][0] == 2
    assert sql(url, "SELECT COUNT(*) FROM icd_claims")[0][0] == 0
    # bought once each, plus the one call each killed server had in flight
    assert (sql(url, "SELECT calls FROM icd_ledger")[0][0], teacher_app.state.requests) == (4, 4)
    ledger = sql(url, "SELECT state, attempts FROM icd_service_ledger ORDER BY created")
    assert ledger == [("paid", 2), ("paid", 2)]  # both attempts on the books, each settled once


def _label_page(c: httpx.Client) -> tuple[str, str]:
    html = c.get("/label").text
    qid = re.search(r"action='/label/([0-9a-f]+)'", html)
    csrf = re.search(r"name=csrf value='([^']+)'", html)
    assert qid and csrf, html[:500]
    return qid.group(1), csrf.group(1)


def test_people_on_two_servers_label_one_queue(url, tmp_path):
    with (
        running_service(tmp_path / "a", human=True, pool=url) as (ca, _),
        running_service(tmp_path / "b", human=True, pool=url) as (cb, _),
    ):
        ids = [ca.post("/v1/predict", json=query_json(n, seed=i)).json()["query_id"] for i, n in enumerate(OPTIONS[:2])]
        assert cb.get("/v1/stats").json()["pending_human"] == 2 or wait_until(
            lambda: cb.get("/v1/stats").json()["pending_human"] == 2
        )
        people = []
        for client in (cb, ca):  # one person on each server's /label page
            person = httpx.Client(base_url=str(client.base_url), timeout=30, follow_redirects=True)
            assert person.post("/login", data={"key": KEY}).status_code == 200
            people.append(person)
        try:
            on_b, csrf_b = _label_page(people[0])
            on_a, _ = _label_page(people[1])
            assert on_b == ids[0] and on_a == ids[1]  # the oldest item is leased on b: a's person gets the next
            r = people[0].post(f"/label/{on_b}", data={"label": "red", "csrf": csrf_b})
            assert r.status_code == 200
        finally:
            for p in people:
                p.close()
        # labelled on b, annotated for a, and its demo in a's pool
        got = ca.get(f"/v1/queries/{ids[0]}").json()
        assert got["state"] == "annotated" and got["teacher_answer"] == "red"
        assert wait_until(lambda: ca.get("/v1/demos").json()["total"] == 1)
        assert ca.post(f"/v1/queries/{ids[0]}/label", json={"label": "red"}).status_code == 409


def test_a_server_and_an_icd_run_worker_share_one_pool_and_ledger(url, tmp_path):
    from fakes import FakeEmbedder, FakeStudent, FakeTeacher, colour_folder
    from icdistill.pool import PostgresPool
    from icdistill.runner import Parts, RunConfig, run_icd
    from icdistill.types import image_to_png

    root = colour_folder(tmp_path / "c", n_per_class=2)
    cfg = RunConfig(dataset=str(root), n=None, gate="always", pool=url, max_calls=20)
    run_icd(cfg, tmp_path / "run", parts=Parts(FakeStudent(), FakeTeacher(), FakeEmbedder()))
    with PostgresPool(url) as pool:
        demo = pool.demos()[0]
        png = image_to_png(demo.image)  # read from the pool on use: while it is open
        assert len(pool) == 8 and pool.ledger_state()["calls"] == 8
    teacher = FakeTeacher()
    with running_service(tmp_path, teacher=teacher, pool=url, max_calls=20) as (c, _):
        assert c.get("/v1/demos").json()["total"] == 8  # the run's demos are the server's
        body = {
            "image_b64": b64(png),
            "prompt": demo.prompt,
            "options": demo.provenance["options"],
            "label": demo.answer,
            "wait": True,
        }
        r = c.post("/v1/predict", json=body).json()
        # an image the run already bought: a pool hit, no call, and the student copies the run's label
        assert r["teacher_asked"] is False and "same image and prompt" in r["gate_reason"]
        assert teacher.samples == 0 and r["answer"] == demo.answer
        r = c.post("/v1/predict", json=query_json("red", 50, label="red", wait=True)).json()
        assert r["pool_status"] == "added" and teacher.samples == 1
        wait_until(lambda: c.get("/v1/stats").json()["budget"]["pool_ledger"]["calls"] == 9)  # one ledger


def test_teacher_work_whose_attempt_failed_here_is_adopted_again(url, tmp_path):
    """An attempt that fails on a database error (a lost connection when claiming the label) leaves
    the query pending: its lease must lapse so the work is picked up again, not be renewed forever
    by this live server's heartbeat (it stayed pending until a restart)."""
    from fakes import FakeTeacher

    teacher = FakeTeacher()
    with running_service(tmp_path, teacher=teacher, pool=url, claim_lease_s=1.0) as (c, app):
        pool = app.state.engine.pool
        real_claim, failed = pool.claim, []

        def claim_losing_the_connection_once(query):
            if not failed:
                failed.append(query.id)
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            return real_claim(query)

        pool.claim = claim_losing_the_connection_once
        ack = c.post("/v1/predict", json=query_json("red", 5, label="red")).json()
        assert ack["state"] == "pending_teacher"
        done = wait_until(lambda: (q := c.get(f"/v1/queries/{ack['query_id']}").json())["state"] == "annotated" and q)
        assert failed == [ack["query_id"]] and teacher.samples == 1
        assert done["teacher_answer"] == "red" and done["pool_status"] == "added"
    assert sql(url, "SELECT calls FROM icd_ledger")[0][0] == 1


def test_a_spent_shared_budget_is_the_students_answer_not_a_teacher_failure(url, tmp_path):
    """Other workers spent the pool's global cap: the server's claim is refused. No call was made, so
    the query is answered by the student, not failed, and no teacher call is on its books."""
    from fakes import FakeTeacher
    from icdistill.pool import PostgresPool
    from icdistill.types import Query

    with PostgresPool(url, max_calls=1) as run_worker:  # an icd run worker spends the whole cap
        assert run_worker.claim(Query(id="x", image=None, prompt="p")) == "claimed"
    teacher = FakeTeacher()
    with running_service(tmp_path, teacher=teacher, pool=url) as (c, _):
        r = c.post("/v1/predict", json=query_json("red", 9, label="red", wait=True)).json()
        assert r["state"] == "answered" and r.get("error") is None  # was "failed", a teacher failure
        assert r["teacher_asked"] is False and "budget is spent" in r["gate_reason"]
        st = c.get("/v1/stats").json()
        assert teacher.samples == 0 and st["teacher_calls"] == 0 and st["pending"] == 0
        assert st["budget"]["failed"] == 0 and st["budget"]["reserved"] == 0
    assert sql(url, "SELECT COUNT(*) FROM icd_service_ledger")[0][0] == 0


def test_a_label_reused_from_another_worker_is_no_teacher_call_of_this_server(url, tmp_path):
    """The server waits for another worker's claim and reuses its label: a pool hit, so neither the
    stream (the gate's pace, restored after a restart) nor the ledger counts it as a teacher call."""
    from fakes import FakeEmbedder, FakeTeacher
    from icdistill.pool import PostgresPool
    from icdistill.service.images import decode_image
    from icdistill.types import ANSWER, Annotation, Query

    theirs = Query(id="run-q", image=decode_image(colour_png("red", 9), 10**8), prompt="What colour is it?",
                   options=tuple(OPTIONS), position=0)
    teacher = FakeTeacher()
    with PostgresPool(url, worker="run-worker") as run_worker:
        assert run_worker.claim(theirs) == "claimed"  # it is buying this label now
        with running_service(tmp_path, teacher=teacher, pool=url) as (c, _):
            ack = c.post("/v1/predict", json=query_json("red", 9, label="red")).json()
            assert ack["state"] == "pending_teacher" and ack["teacher_asked"] is True
            e = FakeEmbedder()
            label = Annotation(answer="red", samples=["red"], votes={"red": 1}, agreement=1.0, accepted=True, teacher="t")
            run_worker.add(theirs, label, {**e.embed_query(theirs), ANSWER: e.embed_texts(["red"])[0]})
            done = wait_until(lambda: (q := c.get(f"/v1/queries/{ack['query_id']}").json())["state"] == "annotated" and q)
            assert done["pool_status"] == "reused" and done["answer"] == "red" and teacher.samples == 0
            assert done["teacher_asked"] is False  # was True: counted in every server's pace
            assert "bought by another worker" in done["gate_reason"]
            st = c.get("/v1/stats").json()
            assert st["teacher_calls"] == 0 and st["budget"]["paid"] == 0  # was 1 of each
    assert sql(url, "SELECT COUNT(*) FROM icd_service_queries WHERE teacher_asked")[0][0] == 0
    assert sql(url, "SELECT COUNT(*) FROM icd_service_ledger")[0][0] == 0
    assert sql(url, "SELECT calls FROM icd_ledger")[0][0] == 1  # the run worker's purchase only


def test_the_dollar_cap_of_a_server_is_the_pools_global_one(url, tmp_path):
    """``--max-cost`` on a shared pool: what other workers paid counts. It used to be per server, so
    this server (0 spent by itself) called the teacher though the pool's cap was as good as spent."""
    from fakes import FakeTeacher
    from icdistill.pool import PostgresPool
    from icdistill.types import Annotation, Query, Usage

    with PostgresPool(url, max_cost_usd=1.0) as run_worker:  # an icd run worker paid $0.6 for one call
        q = Query(id="x", image=None, prompt="p")
        assert run_worker.claim(q) == "claimed"
        paid = Annotation("a", ["a"], {"a": 1}, 0.2, False, "t", usage=Usage(calls=1, cost_usd=0.6))
        run_worker.add(q, paid, {})
    teacher = FakeTeacher()
    with running_service(tmp_path, teacher=teacher, pool=url, max_cost_usd=1.0) as (c, _):
        r = c.post("/v1/predict", json=query_json("red", 9, label="red", wait=True)).json()
        assert r["teacher_asked"] is False and "budget is spent" in r["gate_reason"]
        ledger = c.get("/v1/stats").json()["budget"]["pool_ledger"]
        assert teacher.samples == 0 and ledger["cost_usd"] == 0.6 and ledger["max_cost_usd"] == 1.0
