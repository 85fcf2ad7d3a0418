"""`icd serve` against hostile but valid clients (issue 17): no cheap request costs gigabytes, imports
are atomic and checked like every other demo, no cross-site writes, and a person's label is the answer.
Each test runs a real uvicorn server on 127.0.0.1 (``running_service``) driven over HTTP."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
import zipfile

import httpx
import pytest
from PIL import Image

from fakes import FakeStudent, FakeTeacher, GatedTeacher
from icdistill.errors import ICDError
from icdistill.pool import SQLitePool
from icdistill.service.config import ServeConfig
from icdistill.types import TeacherResponse, Usage
from service_helpers import (
    AUTH,
    KEY,
    OPTIONS,
    SQLITE,
    ZIP,
    b64,
    colour_png,
    query_json,
    running_service,
    wait_until,
)


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def demo_line(name: str, i: int, **extra: object) -> dict[str, object]:
    return {
        "prompt": "colour?",
        "label": name,
        "options": OPTIONS,
        "image": f"images/{i}.png",
        "query_id": f"q-{name}-{i}",
        **extra,
    }


def archive(lines: list[dict[str, object]], images: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("demos.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
        for name, data in (images or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def colour_archive(lines: list[dict[str, object]]) -> bytes:
    """The archive, with a colour image for each image name a line gives (``images/<n>.png``)."""
    images = {}
    for line in lines:
        name = str(line.get("image"))
        if name.startswith("images/") and name[7:-4].isdigit():
            images[name] = colour_png(OPTIONS[int(name[7:-4]) % 4], seed=int(name[7:-4]))
    return archive(lines, images)


def pool_size(c: httpx.Client) -> int:
    return c.get("/v1/stats").json()["pool_size"]


# ---------------------------------------------------------------------- 1, 2: resource exhaustion


def test_preprocess_of_an_extreme_aspect_ratio_costs_the_output_only():
    """A 1 x 20,000,000 image raised OverflowError (a 224 x 4.48e9 intermediate); 1 x 20,000 took gigabytes."""
    from icdistill.errors import DataError
    from icdistill.models.efficientnet import preprocess
    from icdistill.types import check_image_shape

    x = preprocess(Image.new("L", (1, 20_000_000)))
    assert tuple(x.shape) == (3, 224, 224)
    with pytest.raises(DataError, match="sides differ"):
        check_image_shape(1, 20_000)
    check_image_shape(28, 28)


@pytest.mark.parametrize("size", [(1, 20_000), (20_000, 1), (1, 20_000_000)])
def test_a_tall_thin_image_is_a_4xx_everywhere(tmp_path, size):
    tall = png(*size)
    assert len(tall) < 100_000
    with running_service(tmp_path, gate="never") as (c, _):
        r = c.post("/v1/predict", json={"image_b64": b64(tall), "prompt": "p"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_image", r.text
        assert "sides differ" in r.json()["error"]["message"]
        r = c.post("/v1/predict", files={"image": ("t.png", tall, "image/png")}, data={"prompt": "p"})
        assert r.status_code == 400, r.text
        r = c.post("/v1/demos", json={"image_b64": b64(tall), "prompt": "p", "label": "x"})
        assert r.status_code == 400, r.text
        r = c.post("/v1/import", content=archive([demo_line("red", 0)], {"images/0.png": tall}), headers=ZIP)
        assert r.status_code == 400 and "line 1" in r.json()["error"]["message"], r.text
        assert pool_size(c) == 0
        assert c.post("/v1/predict", json=query_json("red")).status_code == 200


def test_an_import_counts_the_pixels_of_every_image_it_names(tmp_path):
    """40 lines naming one 23 MP image decoded 920 MP (4.9 GB): the import's images share one budget."""
    big = png(1000, 1000)
    lines = [demo_line("red", i, image="images/big.png") for i in range(4)]
    with running_service(tmp_path, gate="never", max_pixels=1_000_000, max_import_pixels=3_500_000) as (c, _):
        r = c.post("/v1/import", content=archive(lines, {"images/big.png": big}), headers=ZIP)
        assert r.status_code == 413 and r.json()["error"]["code"] == "import_too_large", r.text
        assert pool_size(c) == 0
        r = c.post("/v1/import", content=archive(lines[:3], {"images/big.png": big}), headers=ZIP)
        assert r.status_code == 200 and r.json()["statuses"] == {"added": 1, "duplicate": 2}, r.text


class BlockingStudent(FakeStudent):
    """Blocks in ``predict`` once ``block()`` is called, until ``release()`` (a long model pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocking = threading.Event()
        self.inside = threading.Event()
        self.gate = threading.Event()

    def predict(self, query, demos):
        if self.blocking.is_set():
            self.inside.set()
            self.gate.wait(timeout=60)
        return super().predict(query, demos)


def test_a_prompt_is_bounded_in_tokens_not_characters(tmp_path):
    """4000 combining marks held the inference thread 13x as long as 4000 ASCII letters."""
    marks = "a" + "\u0301" * 3999
    with running_service(tmp_path) as (c, _):
        r = c.post("/v1/predict", json={**query_json("red"), "prompt": marks})
        assert r.status_code == 422 and r.json()["error"]["code"] == "prompt_too_long", r.text
        assert "tokens" in r.json()["error"]["message"]
        r = c.post("/v1/predict", files={"image": ("x.png", colour_png("red"))}, data={"prompt": marks})
        assert r.status_code == 422, r.text
        r = c.post("/v1/demos", json={"image_b64": b64(colour_png("red")), "prompt": marks, "label": "x"})
        assert r.status_code == 422 and pool_size(c) == 0, r.text
        assert c.post("/v1/predict", json={**query_json("red"), "prompt": "a" * 4000}).status_code == 200


def test_reading_a_query_never_waits_behind_the_student(tmp_path):
    student = BlockingStudent()
    with running_service(tmp_path, student=student, gate="never") as (c, _):
        url = str(c.base_url)
        qid = c.post("/v1/predict", json=query_json("red")).json()["query_id"]
        student.blocking.set()
        stuck = threading.Thread(
            target=lambda: httpx.post(url + "/v1/predict", json=query_json("blue"), headers=AUTH, timeout=90)
        )
        stuck.start()
        try:
            assert student.inside.wait(timeout=30)  # the loop thread is now inside a model pass
            got: list[httpx.Response] = []
            reader = threading.Thread(target=lambda: got.append(c.get(f"/v1/queries/{qid}")))
            reader.start()
            reader.join(timeout=30)
            assert got and got[0].status_code == 200 and got[0].json()["query_id"] == qid
            assert student.gate.is_set() is False  # answered while the student was still busy
        finally:
            student.gate.set()
            stuck.join(timeout=60)


# ---------------------------------------------------------------------- 5: atomic, validated imports


@pytest.mark.parametrize(
    ("bad", "status"),
    [
        ({"label": "not a colour"}, 422),
        ({"label": "x" * 100_000, "options": None}, 422),
        ({"options": ["Bag", "Bag", ""], "label": "Bag"}, 422),
        ({"votes": [1, 2]}, 422),
        ({"agreement": "high"}, 422),
        ({"agreement": 7}, 422),
        ({"prompt": "   "}, 422),
        ({"prompt": 5}, 422),
        ({"image": "images/missing.png"}, 422),
    ],
    ids=[
        "label",
        "long-label",
        "options",
        "votes",
        "agreement",
        "agreement-range",
        "prompt",
        "prompt-type",
        "image",
    ],
)
def test_an_import_with_one_bad_line_adds_nothing(tmp_path, bad, status):
    good = [demo_line(OPTIONS[i], i) for i in range(2)]
    with running_service(tmp_path, gate="never") as (c, _):
        r = c.post("/v1/import", content=colour_archive([demo_line("blue", 9)]), headers=ZIP)
        assert r.status_code == 200 and pool_size(c) == 1
        lines = [*good, {**demo_line("green", 2), **bad}]
        r = c.post("/v1/import", content=colour_archive(lines), headers=ZIP)
        assert r.status_code == status, r.text
        assert "line 3" in r.json()["error"]["message"]
        assert pool_size(c) == 1  # the two good lines were not added either
        if set(bad) <= {"prompt", "label", "options"}:  # the same rules as POST /v1/demos
            fields = {
                k: v
                for k, v in {**demo_line("green", 2), **bad}.items()
                if k in ("prompt", "label", "options")
            }
            r = c.post("/v1/demos", json={"image_b64": b64(colour_png("green")), **fields})
            assert r.status_code == 422, r.text


def _icd_pool(path, image: Image.Image, options: str | None = None) -> None:
    """An icd run pool.sqlite with one demo (``options`` overwrites its stored options text)."""
    from fakes import FakeEmbedder
    from icdistill.types import ANSWER, Annotation, Query

    q = Query(id="q0", image=image, prompt="colour?", options=tuple(OPTIONS), position=0)
    emb = FakeEmbedder().embed_query(q)
    emb[ANSWER] = FakeEmbedder().embed_texts(["red"])[0]
    with SQLitePool(path) as pool:
        pool.add(q, Annotation("red", ["red"], {"red": 1}, 1.0, True, "t"), emb)
    if options is not None:
        with sqlite3.connect(path) as db:
            db.execute("UPDATE annotations SET options = ?", (options,))
        db.close()


def test_a_sqlite_import_is_checked_like_any_other(tmp_path):
    empty = tmp_path / "empty.sqlite"
    with sqlite3.connect(empty) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    _icd_pool(tmp_path / "big.sqlite", Image.new("RGB", (1200, 1000)))
    _icd_pool(tmp_path / "notjson.sqlite", Image.new("RGB", (8, 8)), options="not json")
    _icd_pool(tmp_path / "deep.sqlite", Image.new("RGB", (8, 8)), options="[" * 5000)
    _icd_pool(tmp_path / "ok.sqlite", Image.new("RGB", (8, 8), (200, 30, 30)))
    with running_service(tmp_path / "svc", gate="never", max_pixels=1_000_000) as (c, _):
        r = c.post("/v1/import", content=empty.read_bytes(), headers=SQLITE)
        assert r.status_code == 400 and "annotations" in r.json()["error"]["message"], r.text
        r = c.post("/v1/import", content=(tmp_path / "big.sqlite").read_bytes(), headers=SQLITE)
        assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", r.text
        for name in ("notjson", "deep"):
            r = c.post("/v1/import", content=(tmp_path / f"{name}.sqlite").read_bytes(), headers=SQLITE)
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json", r.text
        assert pool_size(c) == 0
        r = c.post("/v1/import", content=(tmp_path / "ok.sqlite").read_bytes(), headers=SQLITE)
        assert r.status_code == 200 and r.json()["imported"] == 1 and pool_size(c) == 1


# ---------------------------------------------------------------------- 6: deeply nested JSON


def test_deeply_nested_json_is_a_400_and_the_connection_stays_open(tmp_path):
    deep = b"[" * 2048 + b"]" * 2048
    with running_service(tmp_path, human=True) as (c, _):
        qid = c.post("/v1/predict", json=query_json("red")).json()["query_id"]
        json_type = {"content-type": "application/json"}
        for path in ("/v1/predict", f"/v1/queries/{qid}/label", "/v1/demos"):
            r = c.post(path, content=deep, headers=json_type)
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json", (path, r.text)
            assert "nested" in r.json()["error"]["message"]
        r = c.post(
            "/v1/predict",
            files={"image": ("x.png", colour_png("red"))},
            data={"prompt": "p", "options": deep.decode()},
        )
        assert r.status_code == 422 and "nested" in r.json()["error"]["message"], r.text
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("demos.jsonl", deep.decode() + "\n")
        r = c.post("/v1/import", content=buf.getvalue(), headers=ZIP)
        assert r.status_code == 400 and "line 1" in r.json()["error"]["message"], r.text
        assert c.get("/v1/stats").status_code == 200


# ---------------------------------------------------------------------- 7, 8: a person's label


def test_a_label_must_be_one_of_the_options_not_the_nearest(tmp_path):
    with running_service(tmp_path, human=True) as (c, _):
        qid = c.post("/v1/predict", json=query_json("red")).json()["query_id"]
        for label in ("not a red", "reds", "gren"):
            r = c.post(f"/v1/queries/{qid}/label", json={"label": label})
            assert r.status_code == 422 and r.json()["error"]["code"] == "bad_label", r.text
        assert c.get(f"/v1/queries/{qid}").json()["state"] == "pending_human"
        r = c.post(f"/v1/queries/{qid}/label", json={"label": " RED "})
        assert r.status_code == 200 and r.json()["teacher_answer"] == "red"


def test_after_a_persons_label_the_query_shows_it_as_the_answer(tmp_path):
    with running_service(tmp_path, human=True) as (c, _):
        first = c.post("/v1/predict", json=query_json("red")).json()
        assert first["state"] == "pending_human" and first["answer"] == "red"  # the student's guess
        qid = first["query_id"]
        r = c.post(f"/v1/queries/{qid}/label", json={"label": "blue"}).json()
        assert r["answer"] == "blue" and r["answered_by"] == "teacher"
        q = c.get(f"/v1/queries/{qid}").json()
        assert q["state"] == "annotated" and q["answer"] == "blue" and q["answered_by"] == "teacher"
        assert q["student_answer"] == "red" and q["teacher_answer"] == "blue"


# ---------------------------------------------------------------------- 9: what a crash cut off was paid


class PricedTeacher(FakeTeacher):
    def sample(self, query, n):
        out = super().sample(query, n)
        return TeacherResponse(out.answers, Usage(calls=1, cost_usd=0.5))


def test_an_attempt_cut_off_by_a_crash_is_counted_as_paid(tmp_path):
    """The request in flight at the crash was sent (maybe answered and billed); the restart buys the
    label again: the ledger counts both, in calls and in money, and so does the cost cap."""
    gated = GatedTeacher()
    with running_service(tmp_path, teacher=gated) as (c, _):
        qid = c.post("/v1/predict", json=query_json("red", label="red")).json()["query_id"]
        wait_until(lambda: gated.started == 1)  # the request is out when the process dies
        assert c.get(f"/v1/queries/{qid}").json()["ledger"]["attempts"] == 1
    try:
        with running_service(tmp_path, teacher=PricedTeacher(), max_cost_usd=10.0) as (c, _):
            done = wait_until(lambda: (q := c.get(f"/v1/queries/{qid}").json())["state"] == "annotated" and q)
            assert done["ledger"]["attempts"] == 2
            assert done["ledger"]["calls"] == 2 and done["ledger"]["cost_usd"] == 1.0
            assert c.get("/v1/stats").json()["budget"]["usd_spent"] == 1.0
    finally:
        gated.release()


# ---------------------------------------------------------------------- 10: no cross-site writes


def test_no_cross_site_writes_nor_foreign_hosts_even_without_auth(tmp_path):
    with running_service(tmp_path, gate="never", api_key=None, no_auth=True) as (c, _):
        url = str(c.base_url)
        payload = colour_archive([demo_line("red", 0)])
        evil = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
        # what fetch(..., {mode: "no-cors"}) sends: text/plain, the attacker's Origin
        r = httpx.post(url + "/v1/import", content=payload, headers={**evil, "content-type": "text/plain"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin", r.text
        r = httpx.post(url + "/v1/import", content=payload, headers={"content-type": "text/plain"})
        assert r.status_code == 415, r.text
        r = httpx.post(
            url + "/v1/predict",
            headers={"Origin": "http://evil.example"},
            files={"image": ("x.png", colour_png("red"))},
            data={"prompt": "colour?"},
        )
        assert r.status_code == 403, r.text
        r = httpx.post(url + "/v1/predict", json=query_json("red"), headers={"Origin": "null"})
        assert r.status_code == 403, r.text
        # DNS rebinding: a name of the attacker's that resolves to 127.0.0.1
        port = url.rsplit(":", 1)[1]
        r = httpx.get(url + "/v1/stats", headers={"Host": f"evil.example:{port}"})
        assert r.status_code == 421 and r.json()["error"]["code"] == "wrong_host", r.text
        assert pool_size(c) == 0 and c.get("/v1/stats").json()["queries"] == 0
        # behind a proxy: the public host comes in X-Forwarded-Host (no page can send it unasked)
        public = {"Host": "icd.example.com", "X-Forwarded-Host": "icd.example.com"}
        old_browser = {**public, "Origin": "https://icd.example.com"}
        assert httpx.post(url + "/v1/predict", json=query_json("red"), headers=old_browser).status_code == 200
        foreign = {**public, "Origin": "https://evil.example"}
        assert httpx.post(url + "/v1/predict", json=query_json("red"), headers=foreign).status_code == 403
        rebound = {"Origin": f"http://evil.example:{port}", "Sec-Fetch-Site": "same-origin"}
        r = httpx.post(
            url + "/v1/predict", json=query_json("red"), headers={**rebound, "Host": f"evil.example:{port}"}
        )
        assert r.status_code == 421, r.text
        # the page itself (same origin) and clients without Origin still write
        same = {"Origin": url, "Sec-Fetch-Site": "same-origin"}
        assert httpx.post(url + "/v1/predict", json=query_json("red"), headers=same).status_code == 200
        assert httpx.get(url.replace("127.0.0.1", "localhost") + "/healthz").status_code == 200
        assert c.post("/v1/import", content=payload, headers=ZIP).json()["imported"] == 1


# ---------------------------------------------------------------------- 12: sessions and keys


def test_sessions_expire_end_at_logout_and_are_secure_over_https(tmp_path):
    from icdistill.service.auth import COOKIE, SESSION_S, Auth

    with running_service(tmp_path, human=True) as (c, _):
        url = str(c.base_url)
        login = httpx.post(url + "/login", data={"key": KEY}, headers={"X-Forwarded-Proto": "https"})
        assert login.status_code == 303
        assert "secure" in login.headers["set-cookie"].lower()
        plain = httpx.post(url + "/login", data={"key": KEY})
        assert "secure" not in plain.headers["set-cookie"].lower()
        cookie = {COOKIE: plain.cookies[COOKIE]}
        assert httpx.get(url + "/label", cookies=cookie).status_code == 200
        old = Auth(KEY).new_session(now=time.time() - SESSION_S - 60)
        assert httpx.get(url + "/label", cookies={COOKIE: old}).headers.get("location") == "/login"
        out = httpx.post(url + "/logout", cookies=cookie)
        assert out.status_code == 303 and COOKIE in out.headers["set-cookie"]
        assert httpx.get(url + "/label", cookies=cookie).headers.get("location") == "/login"


def test_wrong_keys_and_logins_are_throttled_per_address(tmp_path):
    """97 wrong keys a second, 400 wrong logins in 3.9 s: an address that keeps guessing must wait."""
    with running_service(tmp_path) as (c, _):
        url = str(c.base_url)
        other = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=url, transport=other) as guesser:
            codes = [
                guesser.get("/v1/stats", headers={"Authorization": f"Bearer guess-{i:08d}"}).status_code
                for i in range(30)
            ]
            assert codes[:10] == [401] * 10 and set(codes[10:]) == {429}
            r = guesser.get("/v1/stats", headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
            logins = [guesser.post("/login", data={"key": f"guess-{i}"}).status_code for i in range(5)]
            assert set(logins) == {429}
        # another address (the real client) is not locked out
        assert c.get("/v1/stats").status_code == 200
        with httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.3")) as person:
            logins = [person.post("/login", data={"key": f"guess-{i}"}).status_code for i in range(12)]
            assert logins[:10] == [401] * 10 and set(logins[10:]) == {429}


@pytest.mark.parametrize("key", [" " * 9, "aaaaaaaaaaaaaaaaaaaa", "short-key-123", "tab\tinside-key-0123456"])
def test_weak_api_keys_are_refused_beyond_loopback(key):
    with pytest.raises(ICDError, match="API key"):
        ServeConfig(api_key=key, host="0.0.0.0")
    from icdistill.cli import main

    assert main(["serve", "--api-key", key, "--host", "0.0.0.0"]) == 2


def test_a_prompt_of_spaces_is_refused_in_json_as_in_multipart(tmp_path):
    with running_service(tmp_path) as (c, _):
        r = c.post("/v1/predict", json={**query_json("red"), "prompt": "     "})
        assert r.status_code == 422 and "prompt" in r.json()["error"]["message"], r.text
        r = c.post("/v1/predict", files={"image": ("x.png", colour_png("red"))}, data={"prompt": "   "})
        assert r.status_code == 422, r.text
