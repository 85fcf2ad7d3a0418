"""The engine's judge with the student backends users deploy: a tiny random-weight ``hf:`` VLM (built
offline) and an ``openai:`` student on a loopback OpenAI-compatible server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fakes import CopyingColourStudent, FakeEmbedder, LocalServer, colour_folder
from icdistill.models.openai_api import OpenAIChatModel
from icdistill.models.reference import ReferenceTeacher
from icdistill.models.registry import resolve_student
from icdistill.runner import Parts, RunConfig, run_icd
from icdistill.serve_model import create_app
from tiny_vlms import FAMILIES


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_vlm_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("idefics3")
    torch.manual_seed(0)
    FAMILIES["idefics3"][0](path)
    return f"hf:{path}?max_new_tokens=4&dtype=float32&device=cpu&local_files_only=1"


def test_an_hf_student_is_judged_logs_its_events_and_resumes_identically(tmp_path, tiny_vlm_spec):
    data = colour_folder(tmp_path / "c", n_per_class=4, seed=5)
    cfg = RunConfig(dataset=str(data), n=14, budget=0.3, warmup=2, shots=2, student=tiny_vlm_spec)

    def parts() -> Parts:
        return Parts(resolve_student(tiny_vlm_spec), ReferenceTeacher(), FakeEmbedder())

    whole = run_icd(cfg, tmp_path / "whole", parts=parts())
    recs = _log(tmp_path / "whole")
    judged = [r for r in recs if (r["student_details"] or {}).get("judge", {}).get("by") == "judge"]
    assert judged, "no query met the judge"
    assert all(len(r["student_details"]["judge"]["weights"]) == 3 for r in judged)
    assert any(ev[0] == "teach" for r in recs for ev in r["judge_events"])
    # a run stopped after 7 queries, then resumed to 14: the same answers and distributions
    run_icd(RunConfig(**{**cfg.__dict__, "n": 7}), tmp_path / "cut", parts=parts())
    resumed = run_icd(RunConfig(), tmp_path / "cut", resume=True, parts=parts(), changes={"n": 14})
    again = _log(tmp_path / "cut")
    assert [r["option_probs"] for r in again] == [r["option_probs"] for r in recs]
    assert [r["answer"] for r in again] == [r["answer"] for r in recs]
    assert resumed["accuracy"] == whole["accuracy"]


@pytest.mark.parametrize("logprobs", [True, False])
def test_an_openai_student_reads_its_zero_shot_distribution_from_logprobs_or_votes(tmp_path, logprobs):
    """The server's student knows colours alone but copies its nearest demo; the judge reads its
    zero-shot distribution over the API (logprobs, or sampled votes where a server gives none) and
    keeps it where the demos are of another class."""
    data = colour_folder(tmp_path / "c", n_per_class=6, seed=2)
    server_student = CopyingColourStudent()
    app = create_app(server_student)
    with LocalServer(app) as base:
        spec_opts = "" if logprobs else "&logprobs=0&samples=4"
        student = OpenAIChatModel(
            "copying",
            base + "/v1",
            cache=None,
            backoff=0.01,
            timeout=10.0,
            retries=3,
            logprobs=logprobs,
            samples=4,
        )
        cfg = RunConfig(
            dataset=str(data),
            n=24,
            budget=0.15,
            warmup=2,
            shots=2,
            student=f"openai:copying@{base}/v1?cache=0{spec_opts}",
        )
        s = run_icd(cfg, tmp_path / "run", parts=Parts(student, ReferenceTeacher(), FakeEmbedder()))
    recs = _log(tmp_path / "run")
    judged = [r for r in recs if (r["student_details"] or {}).get("judge", {}).get("by") == "judge"]
    zs = [r for r in judged if r["student_details"]["judge"]["zero_shot"]]
    assert zs and server_student.calls["zero-shot"] >= len(zs)
    # where the nearest demos are of another colour (what the copying ICL reading says too), the
    # zero-shot reading carried the answer
    rescued = [
        r
        for r in zs
        if r["student_details"]["judge"]["vote_answer"] != r["label"] and r["first_answer"] == r["label"]
    ]
    assert rescued, [r["student_details"]["judge"] for r in zs]
    assert s["accuracy"] > 0.5
    p = [x for r in zs for x in r["student_details"]["judge"]["zero_shot"]]
    # sampled votes give add-0.5 smoothed shares of 4 answers over 4 options: multiples of 1/12
    from_votes = all(abs(x * 12 - round(x * 12)) < 1e-3 for x in p)
    assert from_votes is not logprobs
