"""`icd serve` under attack and overload (issue 27): throttles that cannot be dodged, logouts that hold
through a restart, imports that are all or nothing through a SIGKILL, a call cap on requests paid,
bounded imports, slowloris, back-pressure, a label page that never waits for the model queue.

Each test runs the service as ``icd serve`` does (``run_server``: its listener and its limits) in a
process of its own (``attack_server.py``, fake models), driven over HTTP or raw sockets."""

from __future__ import annotations

import contextlib
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


# ---------------------------------------------------------------------- 5: an import of tiny lines


def zip_of(text: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("demos.jsonl", text)
    return buf.getvalue()


def test_a_zip_of_millions_of_tiny_lines_is_refused_at_its_first_bad_line_in_bounded_memory(tmp_path):
    bomb = zip_of(b"{}\n" * (16 * 1024 * 1024 // 3))  # 16 MiB unpacked, ~16 KB packed
    assert len(bomb) < 100_000
    with serve(tmp_path / "pool.sqlite") as s, client(s.url) as c:
        base = s.rss_kb()
        r = c.post("/v1/import", content=bomb, headers=ZIP)
        assert r.status_code == 422 and "demos.jsonl line 1:" in r.json()["error"]["message"], r.text
        peak = s.rss_kb("VmHWM")
        assert peak - base < 100_000, (base, peak)  # KB: the 16 MiB was never held at once, parsed
        # valid lines past the cap: refused at the cap, naming it
        line = json.dumps({"prompt": "p", "label": "red", "options": OPTIONS}).encode() + b"\n"
        r = c.post("/v1/import", content=zip_of(line * 100_001), headers=ZIP)
        assert r.status_code == 413 and "--max-import-lines" in r.json()["error"]["message"], r.text
        assert c.get("/v1/stats").json()["pool_size"] == 0


# ---------------------------------------------------------------------- 6: slowloris


def slow_client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return sock


def test_slowloris_connections_are_cut_off_and_the_server_keeps_answering(tmp_path):
    with serve(tmp_path / "pool.sqlite", header_timeout_s=3.0) as s:
        port = int(s.url.rsplit(":", 1)[1])
        socks = [slow_client(port) for _ in range(50)]
        closed = threading.Event()

        def drip() -> None:  # a header line a second, as slowloris does, until the server hangs up
            try:
                for i in range(600):
                    for sock in socks:
                        sock.sendall(f"X-Drip-{i}: 1\r\n".encode())
                    if closed.wait(0.5):
                        return
            except OSError:
                return

        t = threading.Thread(target=drip, daemon=True)
        t.start()
        assert httpx.get(s.url + "/healthz", timeout=120).status_code == 200  # answered meanwhile
        for sock in socks:
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1024) == b""  # the server hung up (within 120 s, else a timeout here)
        closed.set()
        for sock in socks:
            sock.close()
        assert httpx.get(s.url + "/healthz", timeout=120).status_code == 200


def test_at_the_connection_cap_one_more_is_refused_and_nothing_runs_out_of_files(tmp_path):
    """With 512 files allowed (a cap of 256 connections), 400 idle connections: those past the cap get
    503 at once; the server never hits 'Too many open files', and answers again as soon as they go."""
    with serve(tmp_path / "pool.sqlite", nofile=512, header_timeout_s=600.0) as s:
        port = int(s.url.rsplit(":", 1)[1])
        socks = []
        refused = 0
        for _ in range(400):
            sock = socket.create_connection(("127.0.0.1", port), timeout=120)
            socks.append(sock)
        for sock in socks[-50:]:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = sock.recv(4096)
            refused += data.startswith(b"HTTP/1.1 503")
        assert refused == 50  # the last ones are over the cap
        for sock in socks:
            sock.close()
        wait_until(lambda: httpx.get(s.url + "/healthz", timeout=120).status_code == 200, timeout=120)
        log = s.log.read_text()
        assert "Too many open files" not in log and "out of system resource" not in log, log[-2000:]


def test_one_address_cannot_take_every_connection(tmp_path):
    """A slowloris host (127.0.0.2) past its per-address cap gets 503 at once; another client
    (127.0.0.1) is still answered while it holds its connections."""
    with serve(tmp_path / "pool.sqlite", max_connections_per_client=20, header_timeout_s=600.0) as s:
        port = int(s.url.rsplit(":", 1)[1])
        socks = []
        for _ in range(30):
            sock = socket.socket()
            sock.settimeout(120)
            sock.bind(("127.0.0.2", 0))
            sock.connect(("127.0.0.1", port))
            socks.append(sock)
        try:
            for sock in socks[-5:]:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 503")
            assert httpx.get(s.url + "/healthz", timeout=120).status_code == 200
        finally:
            for sock in socks:
                sock.close()


# ---------------------------------------------------------------------- 7: back-pressure


def test_a_burst_past_the_queue_is_answered_503_with_retry_after_and_nothing_admitted_is_lost(tmp_path):
    with serve(tmp_path / "pool.sqlite", student_delay_s=1.0, max_queued=4, gate="never") as s:
        results: list[httpx.Response] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            with client(s.url) as c:
                r = c.post("/v1/predict", json=query_json(OPTIONS[i % 4], seed=i))
            with lock:
                results.append(r)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = [r.status_code for r in results]
        assert set(codes) <= {200, 503}, codes
        busy = [r for r in results if r.status_code == 503]
        assert busy and all(int(r.headers["retry-after"]) >= 1 for r in busy), codes
        assert busy[0].json()["error"]["code"] == "overloaded"
        ok = [r.json()["query_id"] for r in results if r.status_code == 200]
        assert len(ok) >= 4
        with client(s.url) as c:  # every acknowledged query is stored
            assert all(c.get(f"/v1/queries/{q}").status_code == 200 for q in ok)
            assert c.get("/v1/stats").json()["queries"] == len(ok)


# ---------------------------------------------------------------------- 8: the label page and the queue


def test_the_label_page_and_a_label_do_not_wait_for_queued_predictions(tmp_path):
    with serve(tmp_path / "pool.sqlite", teacher="human", student_delay_s=1.0, max_queued=64) as s:
        with client(s.url) as c:
            queued = c.post("/v1/predict", json=query_json("red", seed=1)).json()
            assert queued["state"] == "pending_human"
            cookie = {"cookie": f"{COOKIE}={login(c)}"}
            seeded = c.get("/v1/stats").json()["queries"]
        threads = []
        for i in range(16):

            def one(i: int = i) -> None:
                with client(s.url) as cc:
                    cc.post("/v1/predict", json=query_json(OPTIONS[i % 4], seed=10 + i))

            threads.append(threading.Thread(target=one))
            threads[-1].start()
        with client(s.url) as c:
            wait_until(lambda: c.get("/v1/stats").json()["loop_queue"] >= 12, timeout=120)
            page = c.get("/label", headers=cookie)
            assert page.status_code == 200 and queued["query_id"][:8] in page.text
            done = c.get("/v1/stats").json()["queries"] - seeded
            assert done <= 8, done  # the page did not wait for the 12+ predictions queued before it
            csrf = re.search(r"name=csrf value='([^']+)'", page.text).group(1)
            r = c.post(f"/label/{queued['query_id']}", data={"csrf": csrf, "label": "red"}, headers=cookie)
            assert r.status_code == 303 and "saved=" in r.headers["location"]
            assert c.get("/v1/stats").json()["queries"] - seeded < 16  # saved while predictions still wait
            assert c.get(f"/v1/queries/{queued['query_id']}").json()["teacher_answer"] == "red"
        for t in threads:
            t.join()


# ---------------------------------------------------------------------- 10: the small ones


def test_options_that_differ_only_by_case_or_invisibly_are_refused(tmp_path):
    with serve(tmp_path / "pool.sqlite") as s, client(s.url) as c:
        for options in (["Bag", "bag"], ["Bag", "\u200b"], ["Bag", "Bag\u200b"], ["Shirt", " \u2060 "]):
            r = c.post("/v1/predict", json={**query_json("red"), "options": options})
            assert r.status_code == 422, (options, r.text)
        assert c.post("/v1/predict", json={**query_json("red"), "options": ["Bag", "Bags"]}).status_code == 200


def test_the_login_form_trims_the_key_as_the_bearer_header_does(tmp_path):
    with serve(tmp_path / "pool.sqlite", teacher="human") as s, httpx.Client(base_url=s.url, timeout=120) as c:
        login(c, f"  {KEY}\n")


def test_an_import_line_over_the_prompt_limit_is_named(tmp_path):
    with serve(tmp_path / "pool.sqlite", max_prompt_tokens=50) as s, client(s.url) as c:
        lines = [{"prompt": "short", "label": "red", "options": OPTIONS}] * 2
        lines.append({"prompt": "long " * 100, "label": "red", "options": OPTIONS})
        body = zip_of("\n".join(json.dumps(x) for x in lines).encode())
        r = c.post("/v1/import", content=body, headers=ZIP)
        assert r.status_code == 422, r.text
        assert "demos.jsonl line 3" in r.json()["error"]["message"] and "--max-prompt-tokens" in r.text
        assert c.get("/v1/stats").json()["pool_size"] == 0


# ---------------------------------------------------------------------- 9: the label page on any screen

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def layout(page: Any) -> dict[str, Any]:
    """What a person sees without scrolling: the page's width, and where the buttons are."""
    return page.evaluate(
        """() => {
        const vw = window.innerWidth, vh = window.innerHeight;
        const boxes = [...document.querySelectorAll('button[name=label]')].map(b => b.getBoundingClientRect());
        const skip = document.querySelector('button.skip').getBoundingClientRect();
        return {vw, vh, width: document.documentElement.scrollWidth,
                widest: Math.max(...boxes.map(b => b.right)), leftmost: Math.min(...boxes.map(b => b.left)),
                skip_top: skip.top, skip_bottom: skip.bottom, skip_right: skip.right, n: boxes.length};
    }"""
    )


def test_the_label_page_fits_phones_and_desktops_with_long_text_and_many_options(tmp_path):
    from playwright.sync_api import sync_playwright

    long_option = "a very long option " * 26  # 494 characters
    items = [
        {"prompt": "W" * 4000, "options": ["Bag", long_option.strip(), "Shirt"]},  # no space to wrap at
        {"prompt": "Which class? " * 300, "options": [f"class number {i}" for i in range(300)]},
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            for width, height in ((390, 844), (1280, 800)):
                with serve(tmp_path / f"pool-{width}.sqlite", teacher="human") as s:
                    with client(s.url) as c:
                        for item in items:
                            r = c.post("/v1/predict", json={**query_json("red"), **item})
                            assert r.status_code == 200 and r.json()["state"] == "pending_human", r.text
                    page = browser.new_context(viewport={"width": width, "height": height}).new_page()
                    page.goto(s.url + "/login")
                    page.fill("input[name=key]", KEY)
                    page.click("button[type=submit]")
                    page.wait_for_url(re.compile(r".*/label$"))
                    seen = set()
                    for _ in range(2):
                        got = layout(page)
                        seen.add(n_options := got["n"])
                        assert got["width"] <= width, got  # nothing wider than the screen
                        assert got["leftmost"] >= 0 and got["widest"] <= width, got  # every option on screen
                        assert got["skip_top"] >= 0 and got["skip_bottom"] <= height, got  # Skip in reach
                        assert got["skip_right"] <= width, got
                        page.screenshot(path=str(tmp_path / f"label-{width}-{n_options}.png"))
                        page.click("button.skip")
                        page.wait_for_load_state("load")
                    assert seen == {3, 300}, seen
        finally:
            browser.close()
