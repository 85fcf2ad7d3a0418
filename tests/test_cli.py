import json
import subprocess
import sys

import pytest

from fakes import FakeEmbedder, FakeStudent, colour_folder
from icdistill.cli import main
from icdistill.models.reference import ReferenceTeacher
from icdistill.report import plot_run
from icdistill.runlog import read_records
from icdistill.runner import Parts, RunConfig, run_icd


def icd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "icdistill", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["run", "--selector", "magic"], 2, "unknown selector"),
        (["run", "--gate", "sometimes"], 2, "unknown gate"),
        (["run", "--budget", "1.5"], 2, "--budget"),
        (["run", "--shots", "-1"], 2, "shots"),
        (["run", "--warmup", "-1"], 2, "--warmup"),
        (["run", "--selector", "cross-modal", "--k-tt", "0"], 2, "K_tt"),
        (["run", "--n", "x"], 2, "invalid"),
        (["run", "--resume"], 2, "--resume needs --out"),
        (["run", "--dataset", "/no/such/folder"], 1, "/no/such/folder"),
    ],
)
def test_cli_user_errors_are_one_line(args, code, message, tmp_path):
    r = icd(*args, "--out", str(tmp_path / "o")) if "--resume" not in args else icd(*args)
    assert r.returncode == code, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_unknown_spec_exit_2(tmp_path):
    root = colour_folder(tmp_path / "c", n_per_class=2)
    r = icd("run", "--dataset", str(root), "--student", "nope:thing", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown model spec 'nope:thing'" in r.stderr and "Traceback" not in r.stderr
    r = icd(
        "run",
        "--dataset",
        str(root),
        "--teacher",
        "local:smollm2",
        "--student",
        "reference",
        "--out",
        str(tmp_path / "o2"),
    )
    assert r.returncode == 2 and "cannot be used as student" in r.stderr


def test_cli_refuses_existing_run_and_missing_resume(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "log.jsonl").write_text("")
    assert main(["run", "--out", str(out), "--dataset", str(colour_folder(tmp_path / "c", 2))]) == 1
    assert main(["run", "--resume", "--out", str(tmp_path / "empty")]) == 1


def test_cli_models_lists_specs():
    r = icd("models")
    assert r.returncode == 0
    for spec in ("local:smollm2", "reference", "hf:", "openai:"):
        assert spec in r.stdout


def test_run_writes_log_summary_and_resumes(tmp_path):
    root = colour_folder(tmp_path / "c", n_per_class=6)
    cfg = RunConfig(dataset=str(root), n=20, budget=0.2, warmup=3, shots=2)
    parts = Parts(student=FakeStudent(), teacher=ReferenceTeacher(), embedder=FakeEmbedder())
    out = tmp_path / "run"
    s = run_icd(cfg, out, parts=parts)
    for key in (
        "n_queries",
        "accuracy",
        "teacher_calls",
        "teacher_call_rate",
        "rejected_annotations",
        "pool_size",
        "demonstration_accuracy",
        "student_seconds",
        "teacher_seconds",
        "config",
    ):
        assert key in s
    assert s["n_queries"] == 20 and json.loads((out / "summary.json").read_text())["n_queries"] == 20
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 20
    rec = json.loads(lines[0])
    for key in (
        "answer",
        "correct",
        "uncertainty",
        "teacher_asked",
        "gate_reason",
        "demo_ids",
        "seconds",
        "annotation",
    ):
        assert key in rec
    # tear the log mid-line and cut it back to 11 complete lines: resume finishes the other 9
    torn = "\n".join(lines[:11]) + "\n" + lines[11][:25]
    (out / "log.jsonl").write_text(torn)
    s2 = run_icd(
        RunConfig(), out, resume=True, parts=Parts(FakeStudent(), ReferenceTeacher(), FakeEmbedder())
    )
    assert s2["n_queries"] == 20 and s2["resumed_at"] == 11
    positions = [json.loads(x)["position"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert positions == list(range(20))
    assert len(read_records(out / "log.jsonl")) == 20
    png = plot_run(read_records(out / "log.jsonl"), tmp_path / "run.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_serve_model_unknown_spec_is_a_usage_error():
    r = icd("serve-model", "nope:thing", "--port", "0")
    assert r.returncode == 2 and "unknown model spec" in r.stderr and "Traceback" not in r.stderr
