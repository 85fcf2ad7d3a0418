"""End to end: `icd run` with a tiny Hugging Face VLM student and an OpenAI-compatible teacher served
on 127.0.0.1 that injects faults (timeouts, 500, 429, malformed JSON, wrong number of choices)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fakes import ColourStudent, LocalServer, colour_folder
from icdistill.conformance import check_student
from icdistill.models.registry import resolve_student
from icdistill.serve_model import FaultPlan, create_app
from tiny_vlms import FAMILIES

pytestmark = pytest.mark.slow


def test_conformance_of_the_colour_teacher():
    check_student(ColourStudent())


def test_icd_run_hf_student_openai_teacher_with_faults(tmp_path):
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-idefics3"
    FAMILIES["idefics3"][0](model_dir)
    data = colour_folder(tmp_path / "colours", n_per_class=4)
    faults = FaultPlan.parse("500,429:1,garbage,wrong_n,slow:3")
    app = create_app(ColourStudent(), faults)
    out = tmp_path / "run"
    with LocalServer(app) as url:
        cmd = [
            sys.executable, "-m", "icdistill", "run",
            "--student", f"hf:{model_dir}?max_side=64&split=0&dtype=float32&device=cpu",
            "--teacher", f"openai:colour-expert@{url}/v1?timeout=1&retries=6&backoff=0.05&cache=0",
            "--dataset", str(data), "--n", "12", "--gate", "budget", "--budget", "0.5", "--warmup", "3",
            "--samples", "3", "--out", str(out), "--quiet",
        ]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        served = app.state.requests
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Loading weights" not in r.stderr  # transformers' own progress bars stay quiet
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_queries"] == 12
    assert summary["teacher_calls"] >= 4
    assert summary["teacher_failures"] == 0
    # every injected fault was met, retried and counted, none crashed the run
    assert summary["teacher_usage"]["faults"] >= 5
    assert served > summary["teacher_calls"]
    # the colour expert's annotations are right, so the pool holds correct demos
    assert summary["teacher_label_accuracy"] == 1.0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert all(len(r["annotation"]["samples"]) == 3 for r in log if r["teacher_asked"])
    assert any(r["demo_ids"] for r in log)


def test_single_image_family_is_refused_clearly(tmp_path):
    cfg = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "icdistill", "run", "--student", f"hf:{tmp_path}", "--dataset",
         str(colour_folder(tmp_path / "c", 2)), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "image" in r.stderr.lower()


def test_tiny_hf_student_resolves_through_registry(tmp_path):
    torch.manual_seed(0)
    FAMILIES["qwen2_vl"][0](tmp_path / "q")
    student = resolve_student(f"hf:{tmp_path / 'q'}?dtype=float32&device=cpu")
    assert student.family == "qwen2_vl"


def _dead_url() -> str:
    """The address of a port nobody listens on (connections are refused at once)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_a_teacher_that_is_down_stops_the_run_and_resume_finishes_it(tmp_path):
    from fakes import FakeEmbedder, FakeStudent
    from icdistill.errors import TeacherUnavailable
    from icdistill.models.openai_api import OpenAIChatModel
    from icdistill.runner import Parts, RunConfig, run_icd

    data = colour_folder(tmp_path / "colours", n_per_class=2)
    cfg = RunConfig(
        student="fake", teacher="openai:colour-expert", embedder="fake", dataset=str(data), n=8,
        gate="budget", budget=1.0, warmup=100, max_teacher_failures=3, seed=0,
    )  # fmt: skip
    down = OpenAIChatModel("colour-expert", _dead_url(), cache=None, retries=1, backoff=0.01)
    out = tmp_path / "run"
    with pytest.raises(TeacherUnavailable, match="3 times in a row.*--resume"):
        run_icd(cfg, out, parts=Parts(FakeStudent(), down, FakeEmbedder()))
    logged = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all(r["teacher_error"] for r in logged)  # the 3rd is asked again
    with LocalServer(create_app(ColourStudent())) as url:
        up = OpenAIChatModel("colour-expert", url + "/v1", cache=None)
        summary = run_icd(cfg, out, resume=True, parts=Parts(FakeStudent(), up, FakeEmbedder()))
    assert summary["n_queries"] == 8 and summary["resumed_at"] == 2
    logged = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["position"] for r in logged] == list(range(8)) and logged[2]["annotation"] is not None


def test_max_cost_with_an_unpriced_paid_teacher_is_refused(tmp_path):
    from fakes import FakeEmbedder, FakeStudent
    from icdistill.errors import ICDError
    from icdistill.models.openai_api import OpenAIChatModel
    from icdistill.runner import Parts, RunConfig, run_icd

    data = colour_folder(tmp_path / "colours", n_per_class=1)
    cfg = RunConfig(
        student="fake", teacher="openai:gpt-7", embedder="fake", dataset=str(data), n=2, max_cost_usd=1.0
    )
    unpriced = OpenAIChatModel("gpt-7", api_key="sk-x", cache=None)
    with pytest.raises(ICDError, match="price"):
        run_icd(cfg, tmp_path / "run", parts=Parts(FakeStudent(), unpriced, FakeEmbedder()))
    priced = OpenAIChatModel("gpt-7", api_key="sk-x", cache=None, price_in=1, price_out=2)
    assert priced.price_known
