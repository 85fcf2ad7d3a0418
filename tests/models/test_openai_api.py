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
from icdistill.errors import SpecError, TeacherError
from icdistill.models.openai_api import OpenAIChatModel
from icdistill.models.openai_parse import closest_option, first_token_scores, token_entropy, vote_scores
from icdistill.models.openai_prices import known_price, model_price
from icdistill.models.openai_request import format_prompt, parse_prompt
from icdistill.models.registry import ModelContext, resolve_student, resolve_teacher
from icdistill.models.response_cache import CACHE_FILE, ResponseCache
from icdistill.serve_model import FaultPlan, create_app
from icdistill.types import Query, TeacherResponse

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
    monkeypatch.setenv("OPENAI_API_KEY", "sk-xyz")
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
    assert t.sample(open_q, 2).answers == ["yes", "yes"]  # n refused for open answers: one request each
    assert t.usage.calls == 3  # cumulative over the object
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


# --- real servers' quirks, answered the way each server does --------------------------------------


def chat_server(reply):
    """An app whose /v1/chat/completions answers ``reply(body) -> (status, json)``; bodies are kept."""
    app = FastAPI()
    app.state.bodies = []

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> JSONResponse:
        app.state.bodies.append(body)
        status, data = reply(body)
        return JSONResponse(data, status_code=status)

    return app


def ok(texts, finish="stop", **msg) -> tuple[int, dict]:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t, **msg}, "finish_reason": finish}
        for i, t in enumerate(texts)
    ]
    return 200, {
        "object": "chat.completion",
        "choices": choices,
        "usage": {"prompt_tokens": 10, "completion_tokens": 2},
    }


def openai_reasoning_reply(body: dict) -> tuple[int, dict]:
    """OpenAI's o-series / gpt-5 answers to max_tokens, a non-default temperature and logprobs."""
    if "max_tokens" in body:
        return 400, {"error": {
            "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}}  # fmt: skip
    if body.get("temperature", 1) != 1:
        return 400, {"error": {
            "message": f"Unsupported value: 'temperature' does not support {body['temperature']} with this "
            "model. Only the default (1) value is supported.",
            "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value"}}  # fmt: skip
    if "logprobs" in body:
        return 400, {"error": {
            "message": "Unsupported parameter: 'logprobs' is not supported with this model.",
            "type": "invalid_request_error", "param": "logprobs", "code": "unsupported_parameter"}}  # fmt: skip
    return ok(["green"] * body.get("n", 1))


def test_reasoning_model_adapts_once_to_max_completion_tokens_and_default_temperature() -> None:
    app = chat_server(openai_reasoning_reply)
    with LocalServer(app) as base:
        t = OpenAIChatModel("my-proxy-reasoner", base + "/v1", cache=None, backoff=0.01)
        r = t.sample(QS[0], 3)
        assert r.answers == ["green"] * 3 and r.usage.faults == 0
        n_adapt = len(app.state.bodies)
        assert n_adapt == 3  # max_tokens refused, temperature refused, then the answer
        assert t.sample(QS[1], 2).answers == ["green"] * 2
        assert len(app.state.bodies) == n_adapt + 1  # learnt: no more 400s
        last = app.state.bodies[-1]
        assert "max_tokens" not in last and last["max_completion_tokens"] == 128 and "temperature" not in last
        p = t.predict(QS[0], [])  # logprobs refused too: votes
        assert p.answer == "green"


def test_known_reasoning_model_is_asked_right_the_first_time() -> None:
    app = chat_server(openai_reasoning_reply)
    with LocalServer(app) as base:
        t = resolve_teacher(f"openai:o4-mini@{base}/v1?cache=0")
        assert t.sample(QS[0], 2).answers == ["green", "green"]
        (body,) = app.state.bodies
        assert body["max_completion_tokens"] == 4096 and "temperature" not in body
        assert (t.timeout, t.deadline) == (300.0, 930.0)  # reasoning takes minutes
        g = resolve_teacher(
            f"openai:gpt-5-mini@{base}/v1?cache=0&temperature=none&max_tokens=64&reasoning_effort=low"
        )
        g.sample(QS[0], 1)
        assert app.state.bodies[-1]["reasoning_effort"] == "low"
        assert app.state.bodies[-1]["max_completion_tokens"] == 64
    assert OpenAIChatModel("gpt-5-chat-latest", cache=None).max_tokens != 4096


@pytest.mark.parametrize("status", [400, 500])  # llama.cpp server: 400 now, 500 in older builds
def test_llama_cpp_refusing_n_switches_to_one_request_per_sample(status: int) -> None:
    def llama_cpp(body: dict) -> tuple[int, dict]:
        if body.get("n", 1) != 1:
            kind = "invalid_request_error" if status == 400 else "server_error"
            return status, {
                "error": {"code": status, "message": "Only one completion choice is allowed", "type": kind}
            }
        return ok(["blue"])

    app = chat_server(llama_cpp)
    with LocalServer(app) as base:
        t = client(base, retries=3)
        r = t.sample(QS[0], 3)
        assert r.answers == ["blue"] * 3 and len(app.state.bodies) == 4  # one refusal, then 3 singles
        t.sample(QS[1], 2)
        assert len(app.state.bodies) == 6 and all("n" not in b for b in app.state.bodies[1:])
        p = client(base, logprobs=False, samples=3).predict(QS[0], [])  # the vote fallback works too
        assert p.answer == "blue"
        app.state.bodies.clear()
        off = resolve_teacher(f"openai:llama@{base}/v1?cache=0&n=0")
        assert off.sample(QS[0], 2).answers == ["blue", "blue"]
        assert len(app.state.bodies) == 2 and all("n" not in b for b in app.state.bodies)


def test_prices_of_current_models_and_unknown_paid_models(monkeypatch: pytest.MonkeyPatch) -> None:
    for model in ("gpt-5", "gpt-5-mini", "o3", "o4-mini", "chatgpt-4o-latest", "o4-mini-2025-04-16"):
        assert known_price(model) is not None and model_price(model)[1] > 0, model
    assert known_price("gpt-5-mini") != known_price("gpt-5")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert resolve_teacher("openai:gpt-5?cache=0").price_known
    unknown = resolve_teacher("openai:gpt-7-preview?cache=0")
    assert not unknown.price_known and unknown.price_out == 0
    assert resolve_teacher("openai:gpt-7-preview?cache=0&price_in=1&price_out=2").price_known
    assert resolve_teacher("openai:my-model@http://127.0.0.1:9/v1?cache=0").price_known  # a local server


def test_missing_key_for_a_paid_endpoint_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SpecError, match="OPENAI_API_KEY"):
        resolve_teacher("openai:gpt-4o")
    with pytest.raises(SpecError, match="MY_KEY"):
        resolve_teacher("openai:gpt-4o@https://api.openai.com/v1?api_key_env=MY_KEY")
    assert resolve_teacher("openai:qwen@http://127.0.0.1:9/v1?cache=0").name  # local: no key needed


def test_first_token_prefix_is_not_a_confident_option() -> None:
    def brown(body: dict) -> tuple[int, dict]:
        if body.get("logprobs"):
            lp = {"content": [
                {"token": "b", "logprob": -0.05, "top_logprobs": [{"token": "b", "logprob": -0.05},
                                                                   {"token": "g", "logprob": -3.5}]},
                {"token": "rown", "logprob": -0.01, "top_logprobs": [{"token": "rown", "logprob": -0.01}]},
            ]}  # fmt: skip
            status, data = ok(["brown"])
            data["choices"][0]["logprobs"] = lp
            return status, data
        return ok(["brown"] * body.get("n", 1))

    app = chat_server(brown)
    with LocalServer(app) as base:
        p = client(base, samples=4).predict(QS[0], [])
    probs = p.option_probs()
    assert max(probs.values()) < 0.5  # no vote names an option: not {'blue': 0.95}
    assert len(app.state.bodies) == 2  # the greedy answer was checked and votes were asked


def test_refusals_filtered_and_truncated_answers_are_failed_samples(tmp_path: Path) -> None:
    replies = iter([
        ok([None], refusal="I can't help with that."),
        ok(["gre"], finish="length"),
        ok(["green"]),
        ok(["red"], finish="content_filter"),
    ])  # fmt: skip

    def server(body: dict) -> tuple[int, dict]:
        return next(replies)

    app = chat_server(server)
    open_q = Query(id="o", image=QS[0].image, prompt="Describe the image.")
    with LocalServer(app) as base:
        t = client(base, cache=ResponseCache(tmp_path / "c.sqlite"), use_n=False)
        r = t.sample(open_q, 4)
        # concurrent requests: which sample got which reply is not fixed
        assert sorted(r.answers) == ["", "", "", "green"] and r.usage.faults == 3 and r.usage.calls == 4
        assert len(ResponseCache(tmp_path / "c.sqlite")) == 1  # only the real answer is kept
    app2 = chat_server(lambda body: ok([None] * body.get("n", 1), refusal="No."))
    with LocalServer(app2) as base, pytest.raises(TeacherError, match="refused") as e:
        client(base).sample(QS[0], 2)
    assert e.value.usage.faults == 2 and e.value.usage.calls == 1  # the run counts what failed


def test_old_vllm_top_level_errors_are_read() -> None:
    def old_vllm(body: dict) -> tuple[int, dict]:
        if "logprobs" in body:  # vLLM < 0.6 error shape
            return 400, {"object": "error", "message": "top_logprobs must be at most 0 (logprobs disabled)",
                         "type": "BadRequestError", "param": None, "code": 400}  # fmt: skip
        if body["model"] == "missing":
            return 404, {"object": "error", "message": "The model `missing` does not exist.",
                         "type": "NotFoundError", "param": None, "code": 404}  # fmt: skip
        return ok(["red"] * body.get("n", 1))

    app = chat_server(old_vllm)
    with LocalServer(app) as base:
        p = client(base, samples=2).predict(QS[0], [])
        assert p.answer == "red" and "logprobs" not in app.state.bodies[-1]
        with pytest.raises(TeacherError, match="The model `missing` does not exist"):
            OpenAIChatModel("missing", base + "/v1", cache=None).sample(QS[0], 1)


def test_used_up_quota_and_a_url_without_scheme_fail_at_once() -> None:
    quota = {"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
                       "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}  # fmt: skip
    app = chat_server(lambda body: (429, quota))
    with LocalServer(app) as base, pytest.raises(TeacherError, match="quota"):
        client(base, retries=4).sample(QS[0], 1)
    assert len(app.state.bodies) == 1
    with pytest.raises(SpecError, match="scheme"):
        OpenAIChatModel("m", "127.0.0.1:8000/v1")


def test_redirect_fails_at_once_with_the_new_address() -> None:
    app = FastAPI()
    hits: list[int] = []

    @app.post("/v1/chat/completions")
    async def chat() -> JSONResponse:
        hits.append(1)
        return JSONResponse(
            {}, status_code=301, headers={"location": "https://api.example.test/v1/chat/completions"}
        )

    with LocalServer(app) as base, pytest.raises(TeacherError, match="https://api.example.test"):
        client(base, retries=4).sample(QS[0], 1)
    assert len(hits) == 1


def test_deadline_bounds_a_request_with_all_its_retries() -> None:
    app, srv = faulty("slow:0.5*50")
    with srv as base:
        t = client(base, timeout=0.2, retries=50, deadline=1.0)
        with pytest.raises(TeacherError, match="deadline"):
            t.sample(QS[0], 1)
    assert app.state.requests < 51  # stopped by the deadline, not by running out of retries


def test_palette_images_with_different_palettes_get_different_uris(server) -> None:
    base, _, _ = server
    a = Image.new("P", (8, 8), 0)
    a.putpalette([255, 0, 0] * 256)
    b = Image.new("P", (8, 8), 0)
    b.putpalette([0, 0, 255] * 256)
    t = client(base)
    ua = t.build_messages(Query(id="a", image=a, prompt="x"), [])[0]["content"][0]["image_url"]["url"]
    ub = t.build_messages(Query(id="b", image=b, prompt="x"), [])[0]["content"][0]["image_url"]["url"]
    assert ua != ub
    pix = Image.open(io.BytesIO(base64.b64decode(ub.split(",", 1)[1]))).convert("RGB").getpixel((0, 0))
    assert pix[2] > 200 and pix[0] < 50


def test_run_seed_is_part_of_the_sample_key_unless_seed_is_pinned(tmp_path: Path) -> None:
    student = RecordingStudent(count_answers=True)
    app = create_app(student, ignore_n=True)
    q = Query(id="o", image=QS[0].image, prompt="Describe the image.")
    with LocalServer(app) as base:
        spec = f"openai:fake@{base}/v1?cache_dir={tmp_path}&backoff=0.01"
        first = resolve_teacher(spec, ModelContext(seed=1)).sample(q, 2)
        same = resolve_teacher(spec, ModelContext(seed=1)).sample(q, 2)
        other = resolve_teacher(spec, ModelContext(seed=2)).sample(q, 2)
        assert same.answers == first.answers and same.usage.calls == 0
        assert other.usage.calls == 2 and set(other.answers).isdisjoint(first.answers)
        pinned = spec + "&seed=5"
        resolve_teacher(pinned, ModelContext(seed=1)).sample(q, 2)
        again = resolve_teacher(pinned, ModelContext(seed=2)).sample(q, 2)
        assert again.usage.calls == 0  # a pinned seed replays across run seeds


def test_quoted_system_prompt_reaches_the_server_whole() -> None:
    app = chat_server(lambda body: ok(["red"] * body.get("n", 1)))
    system = "You label colours, one word, no punctuation. Unsure? Say so & stop."
    with LocalServer(app) as base:
        t = resolve_teacher(f'openai:fake@{base}/v1?system="{system}"&cache=0')
        assert t.model == "fake"
        t.sample(QS[0], 1)
    assert app.state.bodies[0]["messages"][0] == {"role": "system", "content": system}


def _dead_url() -> str:
    """A loopback address nothing listens on (a port bound, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_reachability_probe_fails_at_once_when_the_server_is_down(server) -> None:
    from icdistill.models.registry import check_reachable

    base, app, _ = server
    check_reachable(client(base))  # serve-model lists its models
    assert app.state.requests == 0  # the probe is no chat call
    with LocalServer(chat_server(lambda body: ok(["a"]))) as bare:
        check_reachable(client(bare))  # no /models route (404): the server still answers
    down = OpenAIChatModel("m", _dead_url(), cache=None, retries=4)
    with pytest.raises(TeacherError, match="cannot reach http://127.0.0.1") as e:
        check_reachable(down)
    assert down.usage.faults == 0 and "\n" not in str(e.value)
    keyed = FastAPI()

    @keyed.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)

    with LocalServer(keyed) as base2, pytest.raises(TeacherError, match="HTTP 401: invalid api key"):
        check_reachable(client(base2))
    check_reachable(FakeStudent())  # nothing to probe


def test_predict_batch_sends_the_batch_together() -> None:
    # a micro-batch of an openai: student (--batch 4): four requests open at once at the server,
    # the same answers as one predict each
    app = create_app(RecordingStudent())
    state = {"now": 0, "max": 0, "total": 0}
    four_open = asyncio.Event()

    @app.middleware("http")
    async def track(request: Request, call_next):
        state["now"] += 1
        state["total"] += 1
        state["max"] = max(state["max"], state["now"])
        if state["now"] == 4:
            four_open.set()
        try:
            if state["max"] < 4:  # the first requests wait (generously) for the rest of the batch
                await asyncio.wait_for(four_open.wait(), timeout=120)
            return await call_next(request)
        finally:
            state["now"] -= 1

    queries = (QS * 2)[:4]
    with LocalServer(app) as base:
        model = client(base, concurrency=4)
        got = model.predict_batch(queries, [[]] * 4)
        want = [model.predict(q, []) for q in queries]
        # read ahead (the loop's --batch): the batch's requests go out together, and predict takes
        # their answers without asking again
        asked = state["total"]
        model.prefetch(queries, [[]] * 4)
        assert state["total"] == asked + 4
        taken = [model.predict(q, []) for q in queries]
        assert state["total"] == asked + 4
    assert [t.answer for t in taken] == [w.answer for w in want]
    assert state["max"] == 4
    assert [g.answer for g in got] == [w.answer for w in want]
    assert all(g.option_scores == pytest.approx(w.option_scores) for g, w in zip(got, want, strict=True))
