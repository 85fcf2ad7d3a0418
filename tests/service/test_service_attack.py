"""`icd serve` under attack and overload (issue 27): throttles that cannot be dodged, logouts that hold
through a restart, imports that are all or nothing through a SIGKILL, a call cap on requests paid,
bounded imports, slowloris, back-pressure, a label page that never waits for the model queue.

Each test runs the service as ``icd serve`` does (``run_server``: its listener and its limits) in a
process of its own (``attack_server.py``, fake models), driven over HTTP or raw sockets."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from fakes import ColourStudent, LocalServer
from icdistill.serve_model import FaultPlan, create_app
from service_helpers import AUTH, KEY, OPTIONS, ZIP, colour_png, query_json, wait_until

SERVER = Path(__file__).with_name("attack_server.py")
COOKIE = "icd_label_session"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A running `icd serve` process: its URL, its pid, its log."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def rss_kb(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(field)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def serve(pool: Path, nofile: int | None = None, **settings: Any) -> Iterator[Served]:
    port = free_port()
    log = pool.with_suffix(f".{port}.log")

    def limits() -> None:
        if nofile is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, str(SERVER), str(pool), str(port), json.dumps(settings)],
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=limits,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"service exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            return httpx.get(url + "/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    served = Served(proc, url, log)
    try:
        wait_until(up, timeout=120)
        yield served
    finally:
        served.stop(signal.SIGKILL)


def client(url: str, **kw: Any) -> httpx.Client:
    return httpx.Client(base_url=url, headers=AUTH, timeout=120, **kw)


# ---------------------------------------------------------------------- 1: the throttle's client


def test_wrong_keys_from_one_socket_are_throttled_whatever_x_forwarded_for_says(tmp_path):
    with serve(tmp_path / "pool.sqlite") as s, httpx.Client(base_url=s.url, timeout=120) as c:
        codes = []
        for i in range(30):
            r = c.get(
                "/v1/stats",
                headers={"Authorization": "Bearer wrong-key-123", "X-Forwarded-For": f"10.9.{i}.1"},
            )
            codes.append(r.status_code)
        assert 429 in codes, codes
        assert codes.index(429) <= 10
        limited = c.get(
            "/v1/stats", headers={"Authorization": "Bearer nope", "X-Forwarded-For": "10.200.0.1"}
        )
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1


def test_wrong_logins_are_throttled_by_socket_and_the_429_says_when_to_retry(tmp_path):
    with (
        serve(tmp_path / "pool.sqlite", teacher="human") as s,
        httpx.Client(base_url=s.url, timeout=120) as c,
    ):
        last = None
        for i in range(30):
            last = c.post("/login", data={"key": f"wrong-{i}"}, headers={"X-Forwarded-For": f"10.9.{i}.1"})
            if last.status_code == 429:
                break
        assert last is not None and last.status_code == 429, last.status_code
        assert int(last.headers["retry-after"]) >= 1
        assert "Too many wrong keys" in last.text


def test_a_configured_proxy_may_name_the_client(tmp_path):
    """With --forwarded-allow-ips naming the proxy (here 127.0.0.1), X-Forwarded-For is believed: one
    address's wrong keys do not lock out another's."""
    with (
        serve(tmp_path / "pool.sqlite", forwarded_allow_ips="127.0.0.1") as s,
        httpx.Client(base_url=s.url, timeout=120) as c,
    ):
        for _ in range(12):
            c.get("/v1/stats", headers={"Authorization": "Bearer wrong-key-1", "X-Forwarded-For": "10.1.1.1"})
        assert (
            c.get(
                "/v1/stats", headers={"Authorization": "Bearer x", "X-Forwarded-For": "10.1.1.1"}
            ).status_code
            == 429
        )
        assert c.get("/v1/stats", headers={**AUTH, "X-Forwarded-For": "10.2.2.2"}).status_code == 200


# ---------------------------------------------------------------------- 2: logout through a restart


def login(c: httpx.Client, key: str = KEY) -> str:
    r = c.post("/login", data={"key": key})
    assert r.status_code == 303 and r.headers["location"] == "/label", (r.status_code, r.text[:300])
    return r.cookies[COOKIE]


def test_a_logged_out_session_stays_out_after_a_restart(tmp_path):
    pool = tmp_path / "pool.sqlite"
    with serve(pool, teacher="human") as s, httpx.Client(base_url=s.url, timeout=120) as c:
        cookie = login(c)
        other = login(c)  # a second session, never logged out
        as_cookie = {"cookie": f"{COOKIE}={cookie}"}
        assert c.get("/label", headers=as_cookie).status_code == 200
        assert c.post("/logout", headers=as_cookie).status_code == 303
        assert c.get("/label", headers=as_cookie).status_code == 303
        s.stop()  # a clean stop; the SIGKILL below covers the rest
    with serve(pool, teacher="human") as s, httpx.Client(base_url=s.url, timeout=120) as c:
        assert c.get("/label", headers=as_cookie).status_code == 303
        assert c.get("/label", headers={"cookie": f"{COOKIE}={other}"}).status_code == 200
        third = login(c)
        assert c.post("/logout", headers={"cookie": f"{COOKIE}={third}"}).status_code == 303
        s.stop(signal.SIGKILL)
    with serve(pool, teacher="human") as s, httpx.Client(base_url=s.url, timeout=120) as c:
        assert c.get("/label", headers={"cookie": f"{COOKIE}={third}"}).status_code == 303


# ---------------------------------------------------------------------- 3: an import through a SIGKILL


def colour_zip(n: int, start: int = 0) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        lines = []
        for i in range(start, start + n):
            name = OPTIONS[i % 4]
            lines.append(
                json.dumps(
                    {
                        "prompt": "colour?",
                        "label": name,
                        "options": OPTIONS,
                        "image": f"images/{i}.png",
                        "query_id": f"imp-{i}",
                    }
                )
            )
            z.writestr(f"images/{i}.png", colour_png(name, seed=i))
        z.writestr("demos.jsonl", "\n".join(lines) + "\n")
    return buf.getvalue()


def annotations(pool: Path) -> int:
    db = sqlite3.connect(f"{pool.as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        return int(db.execute("SELECT COUNT(*) FROM annotations").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def test_sigkill_during_an_import_leaves_nothing_of_it(tmp_path):
    pool = tmp_path / "pool.sqlite"
    n = 1000
    data = colour_zip(n)
    with serve(pool) as s:
        with client(s.url) as c:
            assert (
                c.post("/v1/import", content=colour_zip(3, start=5000), headers=ZIP).json()["imported"] == 3
            )
        before = annotations(pool)
        answer: list[Any] = []

        def send() -> None:
            try:
                with client(s.url) as c:
                    answer.append(c.post("/v1/import", content=data, headers=ZIP))
            except httpx.HTTPError as e:
                answer.append(e)

        t = threading.Thread(target=send)
        t.start()
        wait_until(lambda: annotations(pool) > before + 20, timeout=300)
        s.stop(signal.SIGKILL)
        grown = annotations(pool) - before
        t.join(timeout=60)
    assert 0 < grown < n, grown  # killed part way through
    assert answer and isinstance(answer[0], httpx.HTTPError), answer  # nobody was told it was done
    with serve(pool) as s, client(s.url) as c:
        stats = c.get("/v1/stats").json()
        assert stats["pool_size"] == 3, stats  # the earlier import only
        assert annotations(pool) == before
        again = c.post("/v1/import", content=data, headers=ZIP)  # and it can be sent again, whole
        assert again.status_code == 200 and again.json()["imported"] == n, again.text
        assert c.get("/v1/stats").json()["pool_size"] == n + 3


# ---------------------------------------------------------------------- 4: the call cap on requests paid


def metric(c: httpx.Client, name: str) -> float:
    text = c.get("/metrics").text
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert m, text
    return float(m.group(1))


def test_max_calls_caps_requests_paid_including_those_a_crash_bought_again(tmp_path):
    pool = tmp_path / "pool.sqlite"
    teacher_app = create_app(ColourStudent(), FaultPlan.parse("slow:120*4"))
    with LocalServer(teacher_app) as teacher_url:
        teacher = f"openai:colour-expert@{teacher_url}/v1?timeout=300&retries=0&cache=0"
        settings = {"teacher": teacher, "max_calls": 10}
        with serve(pool, **settings) as s, client(s.url) as c:
            for i in range(4):
                r = c.post("/v1/predict", json=query_json(OPTIONS[i], seed=i, label=OPTIONS[i]))
                assert r.json()["state"] == "pending_teacher"
            wait_until(lambda: teacher_app.state.requests == 4, timeout=120)
            s.stop(signal.SIGKILL)  # four requests in flight: sent, maybe billed, never answered
        with serve(pool, **settings) as s, client(s.url) as c:
            wait_until(lambda: c.get("/v1/stats").json()["pending"] == 0, timeout=120)
            assert teacher_app.state.requests == 8  # each bought again
            for i in range(6):
                c.post("/v1/predict", json=query_json(OPTIONS[i % 4], seed=100 + i, label=OPTIONS[i % 4]))
            wait_until(lambda: c.get("/v1/stats").json()["pending"] == 0, timeout=120)
            stats = c.get("/v1/stats").json()
            paid = teacher_app.state.requests
            assert paid <= 10, (paid, stats["budget"])
            assert stats["budget"]["calls_spent"] == paid and stats["teacher_calls"] == paid
            assert metric(c, "icd_teacher_calls") == paid
        with serve(pool, **settings) as s, client(s.url) as c:  # and after a clean restart
            assert c.get("/v1/stats").json()["budget"]["calls_spent"] == paid
            r = c.post("/v1/predict", json=query_json("red", seed=999, label="red")).json()
            assert r["teacher_asked"] is False and "cap" in r["gate_reason"]
