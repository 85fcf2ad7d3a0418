"""``serve-model``: the OpenAI-compatible server over a Student, its request parsing and fault plans."""

from __future__ import annotations

import base64
import io
import math
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fakes import FakeStudent, RecordingStudent
from icdistill import serve_model
from icdistill.conformance import sample_queries
from icdistill.errors import ICDError, SpecError
from icdistill.models import registry
from icdistill.models.openai_request import format_prompt
from icdistill.serve_model import Fault, FaultPlan, create_app, parse_messages
from icdistill.types import Prediction

OPTIONS = sample_queries()[0].options


def data_uri(colour: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, colour: tuple[int, int, int] | None = None) -> dict:
    if colour is None:
        return {"role": "user", "content": text}
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_uri(colour)}},
            {"type": "text", "text": text},
        ],
    }


def chat(c: TestClient, messages: list[dict], **kw) -> dict:
    r = c.post("/v1/chat/completions", json={"model": "m", "messages": messages, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def _token_entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def test_models_endpoint() -> None:
    c = TestClient(create_app(FakeStudent()))
    data = c.get("/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["id"] == "fake-student"


def test_demos_query_and_options_are_parsed() -> None:
    student = RecordingStudent()
    c = TestClient(create_app(student))
    prompt = format_prompt("Which colour is this image?", OPTIONS)
    messages = [
        {"role": "system", "content": "Be brief."},
        user(prompt, (200, 0, 0)),
        {"role": "assistant", "content": "red"},
        user(prompt, (0, 0, 200)),
        {"role": "assistant", "content": "blue"},
        user(prompt, (0, 200, 0)),
    ]
    out = chat(c, messages)
    q, demos = student.seen[-1]
    assert q.prompt == "Which colour is this image?" and q.options == OPTIONS
    assert q.image is not None and q.image.convert("RGB").getpixel((0, 0)) == (0, 200, 0)
    assert [d.answer for d in demos] == ["red", "blue"] and demos[1].image.getpixel((0, 0)) == (0, 0, 200)
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "blue"}  # copies the last demo
    assert out["usage"]["completion_tokens"] == 1
    assert out["usage"]["prompt_tokens"] == 2 + 3 * len(prompt.split()) + 2  # whitespace words
    # the non-standard ``options`` field wins over the prompt line; no line at all means an open answer
    chat(c, [user("Pick one.")], options=["cat", "dog"])
    assert student.seen[-1][0].options == ("cat", "dog")
    out = chat(c, [user("Describe it.")])
    assert student.seen[-1][0].options is None and out["choices"][0]["message"]["content"] == "yes"


def test_n_choices_sampled_with_temperature_and_seed() -> None:
    c = TestClient(create_app(FakeStudent(confident=1.0), seed=1))
    demo = [user("Colour?", (9, 9, 9)), {"role": "assistant", "content": "green"}]
    msgs = [*demo, user(format_prompt("Colour?", OPTIONS))]
    answers = [ch["message"]["content"] for ch in chat(c, msgs, n=60, temperature=1.0)["choices"]]
    assert len(answers) == 60 and set(answers) <= set(OPTIONS) and len(set(answers)) > 1
    assert answers.count("green") > 20  # p(green) = e / (e + 2) = 0.58
    assert {ch["message"]["content"] for ch in chat(c, msgs, n=5, temperature=0)["choices"]} == {"green"}
    a = chat(c, msgs, n=8, seed=7)["choices"]
    b = chat(c, msgs, n=8, seed=7)["choices"]
    assert a == b
    open_answers = chat(c, [user("Describe.")], n=3, temperature=0)["choices"]
    assert [ch["message"]["content"] for ch in open_answers] == ["yes"] * 3  # greedy: copies are right
    # sampled open answers would be copies of the greedy one: refused instead of faked
    r = c.post("/v1/chat/completions", json={"model": "m", "messages": [user("Describe.")], "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_logprobs_from_option_probabilities() -> None:
    c = TestClient(create_app(FakeStudent()))
    msgs = [
        user("Colour?"),
        {"role": "assistant", "content": "blue"},
        user(format_prompt("Colour?", OPTIONS)),
    ]
    ch = chat(c, msgs, logprobs=True, top_logprobs=2)["choices"][0]
    (entry,) = ch["logprobs"]["content"]
    assert entry["token"] == "blue" and math.isclose(math.exp(entry["logprob"]), math.e**2 / (math.e**2 + 2))
    assert [t["token"] for t in entry["top_logprobs"]][0] == "blue" and len(entry["top_logprobs"]) == 2
    assert chat(c, msgs)["choices"][0]["logprobs"] is None
    (tok,) = chat(c, [user("Describe.")], logprobs=True, top_logprobs=3)["choices"][0]["logprobs"]["content"]
    # only what the model reported: no invented alternatives ranked beside the token
    assert (
        tok["token"] == "yes"
        and tok["logprob"] == -0.1
        and tok["top_logprobs"] == [_token_entry("yes", -0.1)]
    )


def test_bad_requests_are_400() -> None:
    c = TestClient(create_app(FakeStudent()))
    post = lambda body: c.post("/v1/chat/completions", json=body)  # noqa: E731
    assert post({"model": "m", "messages": []}).status_code == 400
    assert post({"model": "m", "messages": [{"role": "assistant", "content": "x"}]}).status_code == 400
    remote = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
    r = post({"model": "m", "messages": [remote]})
    assert r.status_code == 400 and "data URI" in r.json()["error"]["message"]
    assert post({"model": "m", "messages": [user("x")], "stream": True}).status_code == 400
    assert post({"model": "m", "messages": [user("x")], "n": 0}).status_code == 400
    assert post({"model": "m", "messages": [user("x")], "options": "a"}).status_code == 400
    assert c.post("/v1/chat/completions", content=b"{nope").status_code == 400


def test_fault_plan_parse() -> None:
    plan = FaultPlan.parse("slow:3, 500,429:2,garbage,wrong_n,500*2")
    assert len(plan) == 7
    got = [plan.next() for _ in range(8)]
    assert got[:3] == [Fault("slow", 3.0), Fault("500"), Fault("429", 2.0)]
    assert got[-3:] == [Fault("500"), Fault("500"), None]
    assert FaultPlan.parse("429").next() == Fault("429", 1.0)
    with pytest.raises(SpecError, match="unknown fault"):
        FaultPlan.parse("503")
    with pytest.raises(SpecError):
        FaultPlan.parse("slow:soon")


def test_faults_at_the_http_level() -> None:
    app = create_app(FakeStudent(), FaultPlan.parse("500,429:2,garbage,wrong_n,slow:0.3"))
    c = TestClient(app)
    body = {"model": "m", "messages": [user("x")], "n": 3, "temperature": 0}
    assert c.post("/v1/chat/completions", json=body).status_code == 500
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()
    assert len(c.post("/v1/chat/completions", json=body).json()["choices"]) == 2
    t0 = time.monotonic()
    assert len(c.post("/v1/chat/completions", json=body).json()["choices"]) == 3
    assert time.monotonic() - t0 >= 0.3
    assert len(c.post("/v1/chat/completions", json=body).json()["choices"]) == 3  # healthy afterwards
    assert app.state.requests == 6 and len(app.state.faults) == 0


def test_ignore_n_and_student_errors() -> None:
    c = TestClient(create_app(FakeStudent(), ignore_n=True))
    assert len(chat(c, [user("x")], n=4, temperature=0)["choices"]) == 1

    class Broken(FakeStudent):
        def predict(self, query, demos):
            raise RuntimeError("boom")

    r = TestClient(create_app(Broken())).post(
        "/v1/chat/completions", json={"model": "m", "messages": [user("x")]}
    )
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "boom" not in r.text and "RuntimeError" not in r.text  # internals stay in the server log


def test_parse_messages_pairs_only_user_assistant() -> None:
    q, demos = parse_messages([user("a"), user("b"), {"role": "assistant", "content": "B"}, user("c")])
    assert q.prompt == "c" and [(d.prompt, d.answer) for d in demos] == [("b", "B")]


def test_main_resolves_spec_and_runs_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict = {}
    student = FakeStudent()
    monkeypatch.setattr(
        registry, "resolve_student", lambda spec, ctx=None: calls.setdefault("spec", spec) and student
    )
    import uvicorn

    monkeypatch.setattr(
        uvicorn, "run", lambda app, host, port, **kw: calls.update(app=app, host=host, port=port)
    )
    serve_model.main("local:smollm2", port=8123, faults="500,garbage")
    assert calls["spec"] == "local:smollm2" and calls["host"] == "127.0.0.1" and calls["port"] == 8123
    assert len(calls["app"].state.faults) == 2 and student.calls == 1  # warmed up before serving


def _png_claiming(width: int, height: int) -> str:
    """A data URI of a real 1x1 PNG whose header claims another size (CRC fixed, so it parses)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"n": 2.5}, "n"),
        ({"n": True}, "n"),
        ({"top_logprobs": "3"}, "top_logprobs"),
    ],
)
def test_bad_parameters_are_openai_shaped_400s(extra: dict, param: str) -> None:
    c = TestClient(create_app(FakeStudent()), raise_server_exceptions=False)
    import json

    body = json.dumps({"model": "m", "messages": [user(format_prompt("Colour?", OPTIONS))], **extra})
    r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_huge_images_and_bodies_are_refused_before_decoding() -> None:
    c = TestClient(create_app(FakeStudent(), max_body_bytes=200_000), raise_server_exceptions=False)
    bomb = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": _png_claiming(30000, 30000)}}],
    }
    r = c.post("/v1/chat/completions", json={"model": "m", "messages": [bomb]})
    assert r.status_code == 400 and "larger than" in r.json()["error"]["message"]
    bomb["content"][0]["image_url"]["url"] = _png_claiming(8000, 8000)  # below PIL's own bomb check
    r = c.post("/v1/chat/completions", json={"model": "m", "messages": [bomb]})
    assert r.status_code == 400 and "8000x8000" in r.json()["error"]["message"]
    big = user("x" * 300_000)
    r = c.post("/v1/chat/completions", json={"model": "m", "messages": [big]})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_api_key_routes_and_model_names() -> None:
    app = create_app(FakeStudent(), served_models=["fake-student", "local:fake"], api_key="sk-serve")
    c = TestClient(app)
    body = {"model": "fake-student", "messages": [user("x")]}
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": "Bearer sk-serve"}
    assert c.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
    assert (
        c.post("/v1/chat/completions", json=body | {"model": "local:fake"}, headers=auth).status_code == 200
    )
    r = c.post("/v1/chat/completions", json=body | {"model": "gpt-4o"}, headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = c.post("/v1/chat/completions", json={"messages": [user("x")]}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert [m["id"] for m in c.get("/v1/models", headers=auth).json()["data"]] == [
        "fake-student",
        "local:fake",
    ]
    r = c.get("/v1/embeddings", headers=auth)
    assert r.status_code == 404 and "error" in r.json()
    r = c.get("/v1/chat/completions", headers=auth)
    assert r.status_code == 405 and "error" in r.json()


def test_open_answers_token_texts_and_empty_answers() -> None:
    class Words(FakeStudent):
        def predict(self, query, demos):
            if query.prompt == "Say nothing.":
                return Prediction(answer="", token_logprobs=[-0.3], token_entropies=[0.1])
            return Prediction(
                answer="a red square", token_logprobs=[-0.1, -0.2, -0.3], token_entropies=[0.1] * 3
            )

    c = TestClient(create_app(Words()))
    entries = chat(c, [user("Describe.")], logprobs=True, top_logprobs=5)["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in entries] == ["a", " red", " square"]
    assert [e["logprob"] for e in entries] == [-0.1, -0.2, -0.3]
    assert all(e["top_logprobs"] == [{k: e[k] for k in ("token", "logprob", "bytes")}] for e in entries)
    r = c.post("/v1/chat/completions", json={"model": "m", "messages": [user("Say nothing.")]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "empty_answer"


def test_main_checks_the_port_and_the_key_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    loaded: list[str] = []
    monkeypatch.setattr(
        registry, "resolve_student", lambda spec, ctx=None: loaded.append(spec) or FakeStudent()
    )
    monkeypatch.delenv("ICD_SERVE_API_KEY", raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ICDError, match="cannot serve on 127.0.0.1"):
            serve_model.main("local:smollm2", port=busy.getsockname()[1])
        with pytest.raises(SpecError, match="unknown model spec"):  # the spec is named first
            serve_model.main("nope:x", port=busy.getsockname()[1])
    with pytest.raises(ICDError, match="API key"):
        serve_model.main("local:smollm2", host="0.0.0.0", port=8123)
    assert loaded == []  # neither mistake cost a model load


def test_open_answers_are_really_sampled_when_the_backend_can() -> None:
    class Sampler(FakeStudent):
        def predict(self, query, demos):
            return Prediction(answer="a cat", token_logprobs=[-0.1], token_entropies=[0.2])

        def sample(self, query, demos, n, temperature, seed):
            rng = np.random.default_rng(seed)
            return [f"answer {int(rng.integers(1000))} at {temperature}" for _ in range(n)]

    c = TestClient(create_app(Sampler()))
    got = [
        ch["message"]["content"]
        for ch in chat(c, [user("Describe.")], n=3, temperature=0.7, seed=5)["choices"]
    ]
    again = [
        ch["message"]["content"]
        for ch in chat(c, [user("Describe.")], n=3, temperature=0.7, seed=5)["choices"]
    ]
    assert got == again and len(set(got)) == 3 and all(a.endswith("at 0.7") for a in got)
    # greedy (temperature 0): copies of the answer, as OpenAI gives
    greedy = chat(c, [user("Describe.")], n=2, temperature=0)["choices"]
    assert [ch["message"]["content"] for ch in greedy] == ["a cat", "a cat"]
    # a backend that cannot sample says so instead of faking samples
    r = TestClient(create_app(FakeStudent())).post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [user("Describe.")], "n": 3, "temperature": 1.0},
    )
    assert r.status_code == 400 and "greedily" in r.json()["error"]["message"]


def test_a_served_student_does_not_pile_up_its_online_events() -> None:
    # local:smollm2 keeps every calibration update as an event for a run log to drain; nobody drains
    # them in serve-model, so a long-lived server grew by one event per request, forever
    class Learning(FakeStudent):
        def __init__(self) -> None:
            super().__init__()
            self.events: list[list] = []

        def predict(self, query, demos):
            self.events.append(["calibrate", query.id])
            return super().predict(query, demos)

        def drain_events(self) -> list[list]:
            out, self.events = self.events, []
            return out

    student = Learning()
    c = TestClient(create_app(student))
    for _ in range(3):
        chat(c, [user("What item of clothing is shown?", (200, 30, 30))], options=list(OPTIONS))
    assert student.events == []
