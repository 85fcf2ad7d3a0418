"""The ``openai:`` backend driven against a real ``serve-model`` server on 127.0.0.1 (with injected faults)."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import sqlite3
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from fakes import FakeStudent, LocalServer, RecordingStudent
from icdistill.conformance import check_student, check_teacher, sample_demos, sample_queries
from icdistill.models.openai_api import (
    OpenAIChatModel,
    closest_option,
    first_token_scores,
    format_prompt,
    model_price,
    parse_prompt,
    token_entropy,
    vote_scores,
)
from icdistill.models.registry import ModelContext, resolve_student, resolve_teacher
from icdistill.models.response_cache import CACHE_FILE, ResponseCache
from icdistill.serve_model import FaultPlan, create_app
from icdistill.types import Query, SpecError, TeacherError, TeacherResponse

QS = sample_queries()
OPTIONS = QS[0].options


def client(base: str, **kw) -> OpenAIChatModel:
    kw = {"cache": None, "backoff": 0.01, "timeout": 5.0, "retries": 3} | kw
    return OpenAIChatModel("fake-vlm", base + "/v1", **kw)


@pytest.fixture
def server():
    """(base_url, app, student) of a healthy server over a RecordingStudent."""
    student = RecordingStudent()
    app = create_app(student)
    with LocalServer(app) as base:
        yield base, app, student


def faulty(plan: str, **kw):
    student = kw.pop("student", None) or RecordingStudent()
    app = create_app(student, FaultPlan.parse(plan), **kw)
    return app, LocalServer(app)


# --- pure helpers ------------------------------------------------------------------------------


def test_prompt_roundtrip_and_option_mapping() -> None:
    text = format_prompt("Which colour?", OPTIONS)
    assert parse_prompt(text) == ("Which colour?", OPTIONS)
    assert parse_prompt("Describe it.") == ("Describe it.", None)
    assert closest_option(" Red.", OPTIONS) == "red"
    assert closest_option("The answer is blue.", OPTIONS) == "blue"
    assert closest_option("gren", OPTIONS) == "green"
    assert closest_option("a cat", OPTIONS) is None
    assert closest_option("ankle boot", ("boot", "ankle boot")) == "ankle boot"
    assert model_price("gpt-4o-2024-08-06") == (2.5, 10.0)
    assert model_price("gpt-4o-mini-2024-07-18") == (0.15, 0.6)
    assert model_price("Qwen/Qwen2-VL-7B") == (0.0, 0.0)


def test_first_token_scores_and_entropy() -> None:
    e = {"token": "red", "logprob": math.log(0.7), "top": [["red", math.log(0.7)], ["Red", math.log(0.1)]]}
    s = first_token_scores([{"token": " ", "logprob": 0.0, "top": []}, e], OPTIONS)
    assert s is not None and set(s) == set(OPTIONS) and all(math.isfinite(v) for v in s.values())
    assert math.isclose(math.exp(s["red"]), 0.8)
    # unlisted options share the unreported mass, capped by the least likely listed token
    assert math.isclose(math.exp(s["green"]), 0.1) and s["green"] == s["blue"]
    # a first token that names two options cannot score them: the caller falls back to votes
    t = {"token": "T", "logprob": -0.1, "top": [["T", -0.1]]}
    assert first_token_scores([t], ("T-shirt", "Trouser", "Bag")) is None
    assert first_token_scores([{"token": "The", "logprob": -0.1, "top": []}], OPTIONS) is None
    flat = {"token": "a", "logprob": math.log(0.5), "top": [["a", math.log(0.5)], ["b", math.log(0.5)]]}
    assert math.isclose(token_entropy(flat), math.log(2))
    assert token_entropy({"token": "a", "logprob": 0.0, "top": []}) < 1e-6
    v = vote_scores(["red", "Red", "blue", "???"], OPTIONS)
    assert max(v, key=v.__getitem__) == "red" and all(math.isfinite(x) for x in v.values())


def test_spec_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ICD_TEST_KEY", "sk-abc")
    t = resolve_teacher(
        "openai:gpt-4o@http://127.0.0.1:9/v1?api_key_env=ICD_TEST_KEY&timeout=3&concurrency=2&retries=1"
        f"&cache_dir={tmp_path}&temperature=0.3&price_in=1&max_side=64"
    )
    assert (t.model, t.base_url, t.timeout, t.concurrency, t.retries) == (
        "gpt-4o",
        "http://127.0.0.1:9/v1",
        3,
        2,
        1,
    )
    assert (t.price_in, t.price_out, t.temperature, t.max_side) == (1.0, 10.0, 0.3, 64)
    assert t.cache is not None and t.cache.path == tmp_path / CACHE_FILE
    assert t.name == "openai:gpt-4o@http://127.0.0.1:9/v1"
    d = resolve_student("openai:gpt-4o-mini?cache=0", ModelContext())
    assert (d.base_url, d.cache, d.price_in, d.name) == (
        "https://api.openai.com/v1",
        None,
        0.15,
        "openai:gpt-4o-mini",
    )
    with pytest.raises(SpecError, match="unknown option"):
        resolve_teacher("openai:gpt-4o?tempreature=1")
    with pytest.raises(SpecError, match="model"):
        resolve_teacher("openai:@http://127.0.0.1:9/v1")


# --- against the server -----------------------------------------------------------------------


def test_happy_path_samples_usage_and_cost(server) -> None:
    base, app, _ = server
    t = client(base, price_in=2.5, price_out=10.0)
    r = t.sample(QS[0], 4)
    assert isinstance(r, TeacherResponse) and len(r.answers) == 4 and set(r.answers) <= set(OPTIONS)
    assert app.state.requests == 1 and r.usage.calls == 1 and r.usage.faults == 0
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens == 4
    expected = (r.usage.prompt_tokens * 2.5 + r.usage.completion_tokens * 10.0) / 1e6
    assert math.isclose(r.usage.cost_usd, expected)
    open_q = Query(id="o", image=QS[0].image, prompt="Describe the image.")
    assert t.sample(open_q, 2).answers == ["yes", "yes"]
    assert t.usage.calls == 2  # cumulative over the object
    t.close()


def test_images_are_data_uris_and_demos_are_turns(server) -> None:
    base, _, student = server
    t = client(base, max_side=64)
    big = Image.new("RGB", (400, 200), (30, 200, 40))
    q = Query(id="g", image=big, prompt="Which colour is this image?", options=OPTIONS)
    demos = sample_demos()
    msgs = t.build_messages(q, demos[:2])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    url = msgs[-1]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.size == (64, 32)
    rgba = Image.new("RGBA", (8, 8), (1, 2, 3, 128))
    assert t.build_messages(Query(id="a", image=rgba, prompt="x"), [])[0]["content"][0]["image_url"][
        "url"
    ].startswith("data:image/png;base64,")

    pred = t.predict(q, demos[:2])
    seen_q, seen_demos = student.seen[-1]
    assert seen_q.prompt == q.prompt and seen_q.options == OPTIONS
    assert max(seen_q.image.size) == 64 and seen_q.image.convert("RGB").getpixel((10, 10))[1] > 150
    assert [d.answer for d in seen_demos] == ["red", "green"] and all(
        d.image.size == (32, 32) for d in seen_demos
    )
    assert pred.answer == "green"  # FakeStudent copies the demo nearest the query (the last)


def test_predict_uses_logprobs(server) -> None:
    base, app, _ = server
    t = client(base)
    p = t.predict(QS[1], sample_demos()[:1])
    assert p.answer == "red" and set(p.option_scores) == set(OPTIONS)
    probs = p.option_probs()
    assert math.isclose(probs["red"], math.exp(2) / (math.exp(2) + 2), rel_tol=1e-6)
    assert p.token_entropies and p.token_entropies[0] > 0 and p.seconds > 0
    assert app.state.requests == 1  # one greedy request, no sampling fallback
    o = t.predict(Query(id="o", image=None, prompt="Say something."), [])
    assert o.answer == "yes" and o.token_logprobs == [-0.1] and o.token_entropies[0] > 0


def test_predict_without_logprobs_scores_votes(server) -> None:
    base, app, _ = server
    t = client(base, logprobs=False, samples=6)
    p = t.predict(QS[0], sample_demos()[2:])  # demo says blue
    assert p.answer == "blue" and set(p.option_scores) == set(OPTIONS)
    assert all(math.isfinite(v) for v in p.option_scores.values())
    assert app.state.requests == 1  # n=6 in one request
    o = t.predict(Query(id="o", image=None, prompt="Say something."), [])
    assert o.answer == "yes" and o.token_entropies == [0.0]  # all samples agree


def test_server_ignoring_n_is_filled_up() -> None:
    app, srv = faulty("", ignore_n=True)
    with srv as base:
        t = client(base)
        r = t.sample(QS[0], 3)
        assert len(r.answers) == 3 and app.state.requests == 3 and r.usage.faults == 1
        r = t.sample(QS[1], 3)  # learnt: one request per answer, no more faults
        assert len(r.answers) == 3 and app.state.requests == 6 and r.usage.calls == 3 and r.usage.faults == 0


def test_slow_server_times_out_then_retries() -> None:
    app, srv = faulty("slow:0.8")
    with srv as base:
        r = client(base, timeout=0.3).sample(QS[0], 2)
        assert len(r.answers) == 2 and r.usage.faults == 1 and r.usage.calls == 1
        assert app.state.requests == 2


def test_500_then_ok() -> None:
    app, srv = faulty("500*2")
    with srv as base:
        r = client(base).sample(QS[0], 2)
        assert len(r.answers) == 2 and r.usage.faults == 2 and app.state.requests == 3


def test_429_honours_retry_after() -> None:
    app, srv = faulty("429:1")
    with srv as base:
        t = client(base)
        t0 = time.monotonic()
        r = t.sample(QS[0], 1)
        waited = time.monotonic() - t0
        assert 0.9 <= waited < 5 and r.usage.faults == 1 and app.state.requests == 2


def test_garbage_is_a_counted_fault() -> None:
    app, srv = faulty("garbage")
    with srv as base:
        r = client(base).sample(QS[0], 3)
        assert len(r.answers) == 3 and r.usage.faults == 1 and r.usage.calls == 1


def test_wrong_number_of_choices_is_filled() -> None:
    app, srv = faulty("wrong_n")
    with srv as base:
        r = client(base).sample(QS[0], 3)
        assert len(r.answers) == 3 and r.usage.faults == 1 and r.usage.calls == 2 and app.state.requests == 2


def test_retries_exhausted_raise_teacher_error() -> None:
    app, srv = faulty("500*10")
    with srv as base:
        t = client(base, retries=2)
        with pytest.raises(TeacherError) as e:
            t.sample(QS[0], 2)
        msg = str(e.value)
        assert "\n" not in msg and "3 attempts" in msg and "HTTP 500" in msg
        assert app.state.requests == 3 and t.usage.faults == 3 and t.usage.calls == 0


def test_sample_many_returns_errors_in_place() -> None:
    app, srv = faulty("500*2")
    with srv as base:
        out = client(base, retries=0).sample_many(QS, 2)
        assert len(out) == 3 and app.state.requests == 3
        assert sum(isinstance(o, TeacherError) for o in out) == 2
        ok = [o for o in out if isinstance(o, TeacherResponse)]
        assert len(ok) == 1 and len(ok[0].answers) == 2


def test_sync_and_async_calls_inside_a_running_loop(server) -> None:
    base, _, _ = server
    t = client(base)

    async def caller() -> tuple[TeacherResponse, TeacherResponse]:
        return t.sample(QS[0], 2), await t.asample(QS[1], 2)

    a, b = asyncio.run(caller())
    assert len(a.answers) == 2 and len(b.answers) == 2
    t.close()
    assert len(t.sample(QS[2], 1).answers) == 1  # usable again after close


def test_disk_cache_hits_and_sample_indices(tmp_path: Path) -> None:
    student = RecordingStudent(count_answers=True)
    app = create_app(student, ignore_n=True)  # every answer is its own request: answers differ
    q = Query(id="o", image=QS[0].image, prompt="Describe the image.")
    with LocalServer(app) as base:
        first = client(base, cache=ResponseCache(tmp_path / "c.sqlite")).sample(q, 3)
        assert sorted(first.answers) == ["answer 1", "answer 2", "answer 3"] and first.usage.calls == 3
        n_requests = app.state.requests
        fresh = client(base, cache=ResponseCache(tmp_path / "c.sqlite"))  # another run, same file
        again = fresh.sample(q, 3)
        assert again.answers == first.answers and app.state.requests == n_requests
        assert again.usage.calls == 0 and again.usage.cost_usd == 0 and fresh.cache_hits == 3
        more = fresh.sample(q, 5)
        assert more.answers[:3] == first.answers and len(set(more.answers)) == 5 and more.usage.calls == 2
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 5


def test_api_key_never_leaks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-test-SECRET-0123456789"
    monkeypatch.setenv("ICD_TEST_KEY", secret)
    monkeypatch.setenv("ICDISTILL_CACHE_DIR", str(tmp_path))
    app = create_app(FakeStudent(), FaultPlan.parse("500"))
    seen: list[str] = []

    @app.middleware("http")
    async def auth(request: Request, call_next):
        seen.append(request.headers.get("authorization", ""))
        if request.headers.get("authorization") != f"Bearer {secret}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        return await call_next(request)

    caplog.set_level(logging.DEBUG)
    with LocalServer(app) as base:
        t = resolve_teacher(f"openai:fake@{base}/v1?api_key_env=ICD_TEST_KEY&backoff=0.01")
        assert len(t.sample(QS[0], 2).answers) == 2 and t.usage.faults == 1
        no_key = resolve_teacher(f"openai:fake@{base}/v1?api_key_env=ICD_NO_SUCH_VAR&cache=0")
        with pytest.raises(TeacherError, match="401") as e:
            no_key.sample(QS[0], 1)
    assert seen[:2] == [f"Bearer {secret}"] * 2 and seen[-1] == ""
    assert "401" in str(e.value) and secret not in str(e.value)
    assert secret not in repr(t) and secret not in str(t) and secret not in caplog.text
    files = list(tmp_path.glob(CACHE_FILE + "*"))
    assert files and all(secret.encode() not in f.read_bytes() for f in files)
    t.close()


def test_conformance_against_server() -> None:
    with LocalServer(create_app(FakeStudent())) as base:
        spec = f"openai:fake@{base}/v1?cache=0"
        check_teacher(resolve_teacher(spec))
        check_student(resolve_student(spec))
        check_student(resolve_student(spec + "&logprobs=0&samples=3"))


def test_concurrency_limit_holds() -> None:
    app = create_app(FakeStudent(), FaultPlan.parse("slow:0.2*6"))
    state = {"now": 0, "max": 0}

    @app.middleware("http")
    async def track(request: Request, call_next):
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        try:
            return await call_next(request)
        finally:
            state["now"] -= 1

    with LocalServer(app) as base:
        out = client(base, concurrency=2).sample_many(QS * 2, 1)
    assert all(isinstance(o, TeacherResponse) for o in out) and state["max"] == 2


def test_server_rejecting_logprobs_falls_back_to_votes() -> None:
    app = FastAPI()
    bodies: list[dict] = []

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> JSONResponse:
        bodies.append(body)
        if "logprobs" in body:
            return JSONResponse({"error": {"message": "logprobs is not supported"}}, status_code=400)
        choices = [{"index": i, "message": {"content": "Green."}} for i in range(body.get("n", 1))]
        return JSONResponse({"choices": choices})

    with LocalServer(app) as base:
        t = client(base, samples=3)
        p = t.predict(QS[0], [])
        assert p.answer == "green" and all(math.isfinite(v) for v in p.option_scores.values())
        t.predict(QS[1], [])  # learnt: logprobs are not asked again
    assert ["logprobs" in b for b in bodies] == [True, False, False]
    assert bodies[1]["n"] == 3 and t.usage.calls == 2 and t.usage.prompt_tokens == 0
