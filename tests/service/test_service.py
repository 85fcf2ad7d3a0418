"""`icd serve` over real uvicorn on 127.0.0.1, driven with httpx; fakes stand in for the models."""

from __future__ import annotations

import io
import json
import threading
import zipfile

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from fakes import FakeTeacher, GatedTeacher, colour_folder
from icdistill.errors import ICDError
from icdistill.pool import SQLitePool
from icdistill.service.config import ServeConfig, config_from_args
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


def test_predict_answers_before_the_teacher_and_the_annotation_joins_the_pool_later(tmp_path):
    teacher = GatedTeacher()
    with running_service(tmp_path, teacher=teacher) as (c, _):
        r = c.post("/v1/predict", json=query_json("red", label="red"))
        assert r.status_code == 200, r.text
        body = r.json()
        # answered while the teacher is still blocked
        assert body["state"] == "pending_teacher" and body["teacher_asked"] is True
        assert body["answer"] in OPTIONS and body["demo_ids"] == []
        assert 0.0 <= body["uncertainty"] <= 1.0
        qid = body["query_id"]
        assert c.get("/v1/stats").json()["pending"] == 1
        assert c.get("/v1/stats").json()["pool_size"] == 0
        teacher.release()
        done = wait_until(lambda: (q := c.get(f"/v1/queries/{qid}").json())["state"] == "annotated" and q)
        assert done["teacher_answer"] == "red"
        assert done["ledger"] == {
            "state": "paid",
            "teacher": "fake-teacher",
            "attempts": 1,
            "calls": 1,
            "cost_usd": 0.0,
        }
        demos = c.get("/v1/demos").json()
        assert demos["total"] == 1 and demos["demos"][0]["query_id"] == qid
        # a later query of the same colour gets that demo and the student copies its answer
        later = c.post("/v1/predict", json=query_json("red", seed=5, label="red")).json()
        assert later["demo_ids"] == [demos["demos"][0]["id"]] and later["student_answer"] == "red"


def test_wait_returns_the_distilled_answer(tmp_path):
    with running_service(tmp_path) as (c, _):
        r = c.post("/v1/predict", json=query_json("blue", label="blue", wait=True)).json()
        assert r["state"] == "annotated" and r["teacher_answer"] == "blue"
        assert r["answered_by"] == "student+new-demo" and r["answer"] == "blue"
        # the same through multipart with ?wait=true
        r = c.post(
            "/v1/predict?wait=true",
            files={"image": ("g.png", colour_png("green"), "image/png")},
            data={"prompt": "What colour is it?", "options": json.dumps(OPTIONS), "label": "green"},
        ).json()
        assert r["state"] == "annotated" and r["answer"] == "green"


def test_teacher_failure_is_reported_not_fatal(tmp_path):
    with running_service(tmp_path, teacher=FakeTeacher(fail=True)) as (c, _):
        r = c.post("/v1/predict", json=query_json("red", label="red", wait=True)).json()
        assert r["state"] == "failed" and "down" in r["error"]
        assert r["ledger"]["state"] == "failed"
        s = c.get("/v1/stats").json()
        assert s["pool_size"] == 0 and s["pending"] == 0 and s["budget"]["failed"] == 1


def test_concurrent_clients_each_get_their_own_answer(tmp_path):
    n_threads, per_thread = 8, 6
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    with running_service(tmp_path, gate="budget", budget=0.3, warmup=4) as (c, _):
        url = str(c.base_url)

        def client(t: int) -> None:
            with httpx.Client(base_url=url, headers=AUTH, timeout=60) as cc:
                for i in range(per_thread):
                    name = OPTIONS[(t + i) % len(OPTIONS)]
                    r = cc.post("/v1/predict", json=query_json(name, seed=100 * t + i, label=name))
                    with lock:
                        (results.append(r.json()) if r.status_code == 200 else errors.append(r.text))

        threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len({r["query_id"] for r in results}) == n_threads * per_thread
        assert sorted(r["position"] for r in results) == list(range(n_threads * per_thread))
        wait_until(lambda: c.get("/v1/stats").json()["pending"] == 0)
        s = c.get("/v1/stats").json()
        asked = sum(r["teacher_asked"] for r in results)
        assert s["queries"] == n_threads * per_thread and s["teacher_calls"] == asked
        assert 0 < asked < n_threads * per_thread  # the budget gate held some back
        assert s["budget"]["paid"] == asked
        assert s["latency_seconds"]["p50"] is not None


# ---------------------------------------------------------------------- auth and bad input


def test_auth_is_required_and_checked(tmp_path):
    with running_service(tmp_path) as (c, _):
        url = str(c.base_url)
        assert httpx.get(url + "/v1/stats").status_code == 401
        bad = httpx.get(url + "/v1/stats", headers={"Authorization": "Bearer wrong-key-000000"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthorized"
        assert bad.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.post(url + "/v1/predict", json=query_json("red")).status_code == 401
        assert httpx.get(url + "/healthz").json() == {"status": "ok"}
        assert httpx.get(url + "/docs").status_code == 200
        paths = httpx.get(url + "/openapi.json").json()["paths"]
        assert {
            "/v1/predict",
            "/v1/queries/{query_id}",
            "/v1/demos",
            "/v1/export",
            "/v1/import",
            "/v1/stats",
        } <= set(paths)


def test_serve_refuses_a_coverage_gate_it_could_not_restore():
    with pytest.raises(ICDError, match="uncertainty only"):
        ServeConfig(no_auth=True, gate_score="coverage")
    assert ServeConfig(no_auth=True).gate_score == "uncertainty"


def test_no_auth_only_on_loopback_and_key_from_env(monkeypatch):
    with pytest.raises(ICDError, match="loopback"):
        ServeConfig(no_auth=True, host="0.0.0.0")
    with pytest.raises(ICDError, match="API key"):
        ServeConfig(api_key=None)
    assert ServeConfig(no_auth=True, host="127.0.0.1").api_key is None
    from icdistill.cli import build_parser

    monkeypatch.setenv("ICD_API_KEY", KEY)
    args = build_parser().parse_args(["serve", "--port", "9999", "--gate", "always"])
    cfg = config_from_args(args)
    assert cfg.api_key == KEY and cfg.port == 9999 and cfg.gate == "always"
    with pytest.raises(ICDError, match="selector"):
        config_from_args(build_parser().parse_args(["serve", "--selector", "psychic"]))
    from icdistill.cli import main

    monkeypatch.delenv("ICD_API_KEY")
    assert main(["serve", "--port", "9999"]) == 2  # no key: refused before any model loads
    assert main(["serve", "--no-auth", "--host", "0.0.0.0"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "words"),
    [
        ({"json": {**query_json("red"), "image_b64": "not base64!!"}}, 400, "bad_base64", "base64"),
        (
            {"json": {**query_json("red"), "image_b64": b64(b"\x89PNG\r\n\x1a\n garbage")}},
            400,
            "bad_image",
            "image",
        ),
        (
            {"json": {**query_json("red"), "image_b64": "https://example.com/cat.png"}},
            400,
            "bad_base64",
            "never fetches",
        ),
        (
            {"json": {**query_json("red"), "image_url": "https://example.com/cat.png"}},
            422,
            "invalid_field",
            "unknown field",
        ),
        ({"json": {**query_json("red"), "options": ["red", "red"]}}, 422, "invalid_field", "unique"),
        ({"json": {**query_json("red"), "options": "red"}}, 422, "invalid_field", "options"),
        ({"json": {"image_b64": b64(colour_png("red"))}}, 422, "invalid_field", "prompt"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "bad_json", "JSON"),
        (
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
            "multipart",
        ),
        ({"data": {"prompt": "p"}, "files": {"other": ("x", b"1")}}, 422, "invalid_field", "unknown field"),
        (
            {"data": {"prompt": "p"}, "files": {"image": ("x.png", b"broken", "image/png")}},
            400,
            "bad_image",
            "corrupt",
        ),
        (
            {"data": {"prompt": "p", "options": "[1, 2"}, "files": {"image": ("x.png", colour_png("red"))}},
            422,
            "invalid_field",
            "options",
        ),
        (
            {"content": b"x" * 3000, "headers": {"content-type": "application/json"}},
            413,
            "body_too_large",
            "limit",
        ),
    ],
)
def test_bad_requests_get_a_clear_4xx(tmp_path, kwargs, status, code, words):
    with running_service(tmp_path, max_body_bytes=2500) as (c, _):
        r = c.post("/v1/predict", **kwargs)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and words.lower() in err["message"].lower()
        # and the service still answers
        assert c.post("/v1/predict", json=query_json("red")).status_code == 200


def test_pixel_limit_stops_decompression_bombs(tmp_path):
    big = io.BytesIO()
    Image.new("L", (4000, 4000)).save(big, format="PNG")  # 16 MP of zeros: a few KB on the wire
    assert len(big.getvalue()) < 100_000
    with running_service(tmp_path, max_pixels=1_000_000) as (c, _):
        r = c.post("/v1/predict", json={"image_b64": b64(big.getvalue()), "prompt": "p"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
        assert "16000000" in r.json()["error"]["message"]


def test_unknown_query_and_demo_are_404(tmp_path):
    with running_service(tmp_path) as (c, _):
        assert c.get("/v1/queries/nope").status_code == 404
        assert c.get("/v1/demos/999").json()["error"]["code"] == "not_found"
        assert c.delete("/v1/demos/999").status_code == 404
        assert c.get("/v1/demos/abc").status_code == 422
        assert c.get("/v1/demos?limit=0").status_code == 422


# ---------------------------------------------------------------------- demos, export, import


def test_demos_add_get_delete_and_paging(tmp_path):
    with running_service(tmp_path, gate="never") as (c, _):
        ids = []
        for i, name in enumerate(OPTIONS * 2):
            demo = {
                "image_b64": b64(colour_png(name, seed=i)),
                "prompt": "colour?",
                "label": name,
                "options": OPTIONS,
            }
            r = c.post("/v1/demos", json=demo)
            assert r.status_code == 201, r.text
            assert r.json()["status"] == "added"
            ids.append(r.json()["id"])
        page = c.get("/v1/demos", params={"offset": 2, "limit": 3}).json()
        assert page["total"] == 8 and [d["id"] for d in page["demos"]] == ids[2:5]
        one = c.get(f"/v1/demos/{ids[0]}").json()
        assert one["label"] == "red" and one["teacher"] == "manual"
        assert Image.open(io.BytesIO(__import__("base64").b64decode(one["image_b64"]))).size == (16, 16)
        # the same image and prompt again is a duplicate, not a second demo
        dup = c.post(
            "/v1/demos",
            json={
                "image_b64": b64(colour_png("red", 0)),
                "prompt": "colour?",
                "label": "red",
                "options": OPTIONS,
            },
        )
        assert dup.json()["status"] == "duplicate" and c.get("/v1/stats").json()["pool_size"] == 8
        assert c.delete(f"/v1/demos/{ids[0]}").status_code == 204
        assert c.get(f"/v1/demos/{ids[0]}").status_code == 404
        assert c.get("/v1/stats").json()["pool_size"] == 7
        # a hand-added demo is used: the student copies the nearest demo's label
        r = c.post("/v1/predict", json=query_json("blue", seed=77)).json()
        assert r["demo_ids"] and r["student_answer"] == "blue" and r["teacher_asked"] is False
        bad = c.post(
            "/v1/demos",
            json={"image_b64": b64(colour_png("red")), "prompt": "c", "label": "x", "options": ["a", "b"]},
        )
        assert bad.status_code == 422


def test_export_then_import_into_a_fresh_service(tmp_path):
    with running_service(tmp_path / "a", gate="never") as (c, _):
        for i, name in enumerate(OPTIONS):
            demo = {
                "image_b64": b64(colour_png(name, seed=i)),
                "prompt": "colour?",
                "label": name,
                "options": OPTIONS,
            }
            c.post("/v1/demos", json=demo)
        archive = c.get("/v1/export")
        assert archive.headers["content-type"] == "application/zip"
        names = zipfile.ZipFile(io.BytesIO(archive.content)).namelist()
        assert "demos.jsonl" in names and sum(n.startswith("images/") for n in names) == 4
    with running_service(tmp_path / "b", gate="never") as (c, _):
        r = c.post("/v1/import", content=archive.content, headers=ZIP).json()
        assert r["imported"] == 4 and r["pool_size"] == 4
        again = c.post("/v1/import", content=archive.content, headers=ZIP).json()
        assert again["imported"] == 0 and again["pool_size"] == 4  # idempotent: same query ids
        demos = c.get("/v1/demos").json()["demos"]
        assert sorted(d["label"] for d in demos) == sorted(OPTIONS)
        assert all(d["options"] == OPTIONS for d in demos)
        assert c.post("/v1/predict", json=query_json("yellow", seed=3)).json()["demo_ids"]
        assert c.post("/v1/import", content=b"PK\x03\x04broken", headers=ZIP).status_code == 400
        assert c.post("/v1/import", content=b"hello", headers=ZIP).status_code == 415


def test_import_an_icd_run_pool(tmp_path):
    from fakes import FakeEmbedder, FakeStudent
    from icdistill.data.stream import load_dataset
    from icdistill.runner import Parts, RunConfig, run_icd

    data = colour_folder(tmp_path / "colours", n_per_class=4)
    cfg = RunConfig(student="fake", teacher="fake", embedder="fake", dataset=str(data), n=12, gate="always")
    run_icd(cfg, tmp_path / "run", parts=Parts(FakeStudent(), FakeTeacher(), FakeEmbedder()))
    n_run = len(SQLitePool(tmp_path / "run" / "pool.sqlite"))
    assert n_run > 0
    with running_service(tmp_path / "svc", gate="never") as (c, _):
        r = c.post("/v1/import", content=(tmp_path / "run" / "pool.sqlite").read_bytes(), headers=SQLITE).json()
        assert r["imported"] == n_run and r["pool_size"] == n_run
        options = list(load_dataset(str(data)).item(0).options)
        p = c.post("/v1/predict", json={**query_json("green", seed=9), "options": options}).json()
        assert p["demo_ids"] and p["student_answer"] == "green"


# ---------------------------------------------------------------------- stats, metrics, persistence


def test_stats_and_prometheus_metrics(tmp_path):
    with running_service(tmp_path, gate="always", max_calls=3) as (c, _):
        for i in range(5):
            c.post("/v1/predict", json=query_json(OPTIONS[i % 4], seed=i, label=OPTIONS[i % 4], wait=True))
        s = c.get("/v1/stats").json()
        assert s["queries"] == 5 and s["teacher_calls"] == 3 and s["teacher_call_rate"] == pytest.approx(0.6)
        assert (
            s["budget"]["calls_spent"] == 3
            and s["budget"]["calls_left"] == 0
            and s["budget"]["calls_cap"] == 3
        )
        assert s["budget"]["usd_spent"] == 0.0 and s["pending"] == 0 and s["pool_size"] == 3
        assert set(s["latency_seconds"]) == {"p50", "p90", "p99"}
        r = c.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        fams = {f.name: f for f in text_string_to_metric_families(r.text)}
        assert fams["icd_pool_size"].samples[0].value == 3
        assert fams["icd_teacher_calls"].samples[0].value == 3
        count = [x for x in fams["icd_predict_seconds"].samples if x.name == "icd_predict_seconds_count"]
        assert count[0].value == 5
        outcomes = {
            x.labels["outcome"]: x.value
            for x in fams["icd_teacher_outcomes"].samples
            if x.name.endswith("_total")
        }
        assert outcomes == {"annotated": 3.0}


def test_budget_and_pool_survive_a_restart(tmp_path):
    with running_service(tmp_path, gate="always", max_calls=4) as (c, _):
        for i in range(3):
            c.post("/v1/predict", json=query_json(OPTIONS[i], seed=i, label=OPTIONS[i], wait=True))
        before = c.get("/v1/stats").json()
    teacher = FakeTeacher()
    with running_service(tmp_path, teacher=teacher, gate="always", max_calls=4) as (c, _):
        s = c.get("/v1/stats").json()
        assert s["teacher_calls"] == before["teacher_calls"] == 3 and s["pool_size"] == 3
        assert s["budget"]["calls_left"] == 1
        got = [
            c.post("/v1/predict", json=query_json("red", seed=50 + i, label="red")).json() for i in range(3)
        ]
        assert [g["teacher_asked"] for g in got] == [True, False, False]  # the cap counts across restarts
        assert [g["position"] for g in got] == [3, 4, 5]


def test_a_paid_annotation_is_not_bought_again_after_a_crash(tmp_path):
    """A crash after the pool commit but before the query row was closed: restart reuses the annotation."""
    teacher = GatedTeacher()
    with running_service(tmp_path, teacher=teacher) as (c, app):
        qid = c.post("/v1/predict", json=query_json("red", label="red")).json()["query_id"]
        engine = app.state.engine
        draft = engine._drafts[qid]
        # the annotation lands in the pool, and the process dies before the store is updated
        ann = FakeTeacher().sample  # noqa: F841 - documents what the teacher would return

        def land() -> None:
            from icdistill.types import ANSWER, Annotation, Usage

            a = Annotation(
                "red", ["red"], {"red": 1}, 1.0, True, "fake-teacher", Usage(calls=1, cost_usd=0.5)
            )
            emb = {**draft.embeddings, ANSWER: engine.distiller.embedder.embed_texts(["red"])[0]}
            engine.pool.add(draft.query, a, emb)

        engine.thread.call_sync(land)
    second = FakeTeacher()
    with running_service(tmp_path, teacher=second) as (c, _):
        q = wait_until(lambda: (r := c.get(f"/v1/queries/{qid}").json())["state"] == "annotated" and r)
        assert second.samples == 0  # not bought twice
        assert (
            q["ledger"]["state"] == "paid" and q["ledger"]["cost_usd"] == 0.5 and q["ledger"]["attempts"] == 1
        )
        assert c.get("/v1/stats").json()["pool_size"] == 1
    teacher.release()


def test_pending_teacher_queries_resume_after_a_restart(tmp_path):
    teacher = GatedTeacher()
    with running_service(tmp_path, teacher=teacher) as (c, _):
        ids = [c.post("/v1/predict", json=query_json(n, label=n)).json()["query_id"] for n in OPTIONS[:3]]
        assert c.get("/v1/stats").json()["pending"] == 3
    teacher.release()  # the old process's calls fail or finish after it is gone; the new one asks again
    with running_service(tmp_path) as (c, _):
        wait_until(lambda: c.get("/v1/stats").json()["pending"] == 0)
        states = [c.get(f"/v1/queries/{q}").json() for q in ids]
        assert all(s["state"] == "annotated" for s in states)
        assert c.get("/v1/stats").json()["pool_size"] == 3


# ---------------------------------------------------------------------- a person as teacher (API level)


def test_human_queue_never_hands_one_item_to_two_labellers(tmp_path):
    with running_service(tmp_path, human=True) as (c, app):
        ids = [c.post("/v1/predict", json=query_json(n, seed=i)).json() for i, n in enumerate(OPTIONS)]
        assert all(r["state"] == "pending_human" for r in ids)
        engine = app.state.engine
        import asyncio

        async def claims() -> list[str | None]:
            got = await asyncio.gather(*(engine.next_label_item(f"labeller-{i}") for i in range(6)))
            return [g["query_id"] if g else None for g in got]

        got = asyncio.run(claims())
        held = [g for g in got if g]
        assert len(held) == 4 and len(set(held)) == 4 and got.count(None) == 2
        # labelling through the API puts the label in the pool at once
        r = c.post(f"/v1/queries/{ids[0]['query_id']}/label", json={"label": "RED"}).json()
        assert r["state"] == "annotated" and r["teacher_answer"] == "red"
        assert c.get("/v1/stats").json()["pool_size"] == 1
        assert c.post(f"/v1/queries/{ids[0]['query_id']}/label", json={"label": "red"}).status_code == 409
        bad = c.post(f"/v1/queries/{ids[1]['query_id']}/label", json={"label": "purple"})
        assert bad.status_code == 422 and "options" in bad.json()["error"]["message"]
        s = c.get("/v1/stats").json()
        assert s["pending_human"] == 3 and s["teacher"] == "human"


def test_service_gives_the_same_answers_as_icd_run_on_the_same_stream(tmp_path):
    """One loop, not two: the same stream through `icd run` and through the service (one client,
    wait=true) gives the same answers, gate decisions and demos."""
    import json as _json

    from fakes import FakeEmbedder, FakeStudent
    from icdistill.data.stream import load_dataset, stream_order
    from icdistill.runner import Parts, RunConfig, query_stream, run_icd
    from icdistill.types import image_to_png

    data = colour_folder(tmp_path / "colours", n_per_class=6)
    loop = {"gate": "budget", "budget": 0.3, "warmup": 3, "shots": 2, "selector": "image", "seed": 0}
    cfg = RunConfig(student="fake", teacher="fake", embedder="fake", dataset=str(data), n=20, **loop)
    run_icd(cfg, tmp_path / "run", parts=Parts(FakeStudent(), FakeTeacher(), FakeEmbedder()))
    offline = [_json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    ds = load_dataset(str(data))
    stream = list(query_stream(ds, stream_order(len(ds), 20, 0, True)))
    with running_service(tmp_path / "svc", **loop) as (c, _):
        online = []
        for q in stream:
            body = {"image_b64": b64(image_to_png(q.image)), "prompt": q.prompt, "options": list(q.options)}
            online.append(c.post("/v1/predict", json={**body, "label": q.label, "wait": True}).json())
    assert [r["teacher_asked"] for r in online] == [r["teacher_asked"] for r in offline]
    assert [r["demo_ids"] for r in online] == [r["demo_ids"] for r in offline]
    assert [r["answer"] for r in online] == [r["answer"] for r in offline]
    assert [r["student_answer"] for r in online] == [r["first_answer"] for r in offline]
    assert 0 < sum(r["teacher_asked"] for r in online) < len(online)


def test_models_never_run_on_the_event_loop_thread(tmp_path):
    import threading as _threading

    from fakes import FakeStudent

    class ThreadRecorder(FakeStudent):
        def __init__(self) -> None:
            super().__init__()
            self.threads: set[str] = set()

        def predict(self, query, demos):
            self.threads.add(_threading.current_thread().name)
            return super().predict(query, demos)

    class TeacherThreads(FakeTeacher):
        def __init__(self) -> None:
            super().__init__()
            self.threads: set[str] = set()

        def sample(self, query, n):
            self.threads.add(_threading.current_thread().name)
            return super().sample(query, n)

    student, teacher = ThreadRecorder(), TeacherThreads()
    with running_service(tmp_path, student=student, teacher=teacher) as (c, _):
        for i in range(4):
            assert (
                c.post(
                    "/v1/predict", json=query_json(OPTIONS[i], seed=i, label=OPTIONS[i], wait=True)
                ).status_code
                == 200
            )
    assert student.threads and all(t.startswith("icd-loop") for t in student.threads)
    assert teacher.threads and all(t.startswith("icd-teacher") for t in teacher.threads)


def test_wait_with_a_person_returns_once_the_label_is_in(tmp_path):
    with running_service(tmp_path, human=True) as (c, app):
        url = str(c.base_url)
        got: list[dict] = []

        def ask() -> None:
            with httpx.Client(base_url=url, headers=AUTH, timeout=60) as cc:
                got.append(cc.post("/v1/predict", json=query_json("green", wait=True)).json())

        t = threading.Thread(target=ask)
        t.start()
        wait_until(lambda: c.get("/v1/stats").json()["pending_human"] == 1)
        engine = app.state.engine
        (queued,) = engine.thread.call_sync(engine.store.pending, "pending_human")
        t.join(timeout=0.3)
        assert t.is_alive() and not got  # the client is still waiting for the person
        assert c.post(f"/v1/queries/{queued['query_id']}/label", json={"label": "green"}).status_code == 200
        t.join(timeout=30)
        assert got and got[0]["query_id"] == queued["query_id"] and got[0]["state"] == "annotated"
        assert got[0]["teacher_answer"] == "green" and got[0]["answered_by"] == "student+new-demo"
        assert got[0]["answer"] == "green"  # the student, re-run with the person's demo


def test_a_second_service_on_the_same_pool_file_is_refused(tmp_path):
    with running_service(tmp_path) as (c, _):
        assert c.get("/v1/stats").status_code == 200
        with pytest.raises(ICDError, match="pool"), running_service(tmp_path):
            pass


def test_a_posted_clean_up_that_fails_is_logged_not_dropped(caplog):
    """A posted clean-up (the release of a shared pool's claim) has nobody waiting on its future: a
    failure was dropped with it, leaving the claim behind without a trace."""
    from icdistill.service.engine import LoopThread

    def release() -> None:
        raise RuntimeError("could not release the claim")

    loop = LoopThread()
    with caplog.at_level("ERROR", logger="icdistill.service.engine"):
        loop.post(release)
        loop.call_sync(lambda: None)  # after the clean-up: one worker thread, in order
        loop.close()
    failures = [r for r in caplog.records if r.exc_info and "could not release" in str(r.exc_info[1])]
    assert len(failures) == 1 and "clean-up" in failures[0].getMessage()
