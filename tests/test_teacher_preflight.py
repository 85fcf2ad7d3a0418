"""What a new user's wrong teacher URL or refused key does to `icd run`: it ends at once, with the
fix named (real OpenAI-compatible servers on 127.0.0.1)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from fakes import FakeEmbedder, FakeStudent, LocalServer, RecordingStudent, colour_folder
from icdistill.cli import main
from icdistill.errors import TeacherRefused
from icdistill.models.openai_api import OpenAIChatModel
from icdistill.models.registry import ModelContext, check_reachable, resolve_teacher
from icdistill.runlog import read_records
from icdistill.runner import Parts
from icdistill.serve_model import create_app


def _use(monkeypatch: pytest.MonkeyPatch, student: FakeStudent, teacher: object) -> None:
    monkeypatch.setattr(
        "icdistill.runner.build_parts", lambda cfg, ctx=None: Parts(student, teacher, FakeEmbedder())
    )


def test_a_base_url_without_v1_is_refused_before_the_stream(tmp_path, monkeypatch, capsys):
    app = create_app(RecordingStudent())  # serves /v1/models and /v1/chat/completions only
    student = FakeStudent()
    with LocalServer(app) as base:
        teacher = OpenAIChatModel("m", base, cache=None, retries=4, backoff=5.0)  # no /v1
        with pytest.raises(TeacherRefused, match=f"try {base}/v1"):
            check_reachable(teacher)
        _use(monkeypatch, student, teacher)
        root = colour_folder(tmp_path / "c", n_per_class=2)
        out = tmp_path / "o"
        assert main(["run", "--dataset", str(root), "--n", "8", "--out", str(out), "--quiet"]) == 1
        check_reachable(OpenAIChatModel("m", base + "/v1", cache=None))  # the right URL passes
    err = capsys.readouterr().err
    assert f"HTTP 404 for POST {base}/chat/completions" in err and f"try {base}/v1" in err
    assert "Traceback" not in err
    assert student.calls == 0 and app.state.requests == 0  # no query streamed, no chat call answered
    assert not out.exists()


def _chat_refused(status: int, message: str) -> FastAPI:
    """A server that lists its models but refuses every chat call with ``status``; calls are counted."""
    app = FastAPI()
    app.state.calls = 0

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

    @app.post("/v1/chat/completions")
    async def chat() -> JSONResponse:
        app.state.calls += 1
        return JSONResponse({"error": {"message": message}}, status_code=status)

    return app


@pytest.mark.parametrize(
    "status, message, shown",
    [
        (401, "invalid api key", "check the key in the OPENAI_API_KEY environment variable"),
        (404, "The model `m` does not exist", "does not exist"),
    ],
)
def test_a_refused_first_teacher_call_ends_the_run_at_once(
    tmp_path, monkeypatch, capsys, status, message, shown
):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    app = _chat_refused(status, message)
    student = FakeStudent()
    root = colour_folder(tmp_path / "c", n_per_class=4)
    out = tmp_path / "o"
    with LocalServer(app) as base:
        teacher = resolve_teacher(f"openai:m@{base}/v1?cache=0&retries=4&backoff=5", ModelContext())
        _use(monkeypatch, student, teacher)
        args = ["run", "--dataset", str(root), "--n", "8", "--out", str(out), "--quiet"]
        assert main([*args, "--max-teacher-failures", "10"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "stopped at the first teacher call" in err and f"HTTP {status}: {message}" in err
    assert shown in err and "api_key_env variable" not in err
    assert app.state.calls == 1  # not retried, and not 10 calls before the run gives up
    assert read_records(out / "log.jsonl") == []  # the refused query is asked again on --resume


def test_the_reference_teacher_on_a_dataset_without_labels_is_refused_before_the_models_load(
    tmp_path, monkeypatch, capsys
):
    import json

    root = colour_folder(tmp_path / "c", n_per_class=2)
    manifest = tmp_path / "m.jsonl"
    images = sorted(root.glob("*/*.png"))
    manifest.write_text("".join(json.dumps({"image": str(p), "options": ["red", "blue"]}) + "\n" for p in images))

    def no_loading(cfg, ctx=None):
        raise AssertionError("the models were loaded")

    monkeypatch.setattr("icdistill.runner.build_parts", no_loading)
    out = tmp_path / "o"
    args = ["run", "--dataset", str(manifest), "--teacher", "reference", "--out", str(out), "--quiet"]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--teacher reference answers with the dataset's labels, and none of its 8 items has one" in err
    assert "Traceback" not in err and not out.exists()
