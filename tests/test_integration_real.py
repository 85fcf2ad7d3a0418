"""`icd run` with the real shipped models (EfficientNet-Lite0, MiniLM, SmolLM2) on a short Fashion-MNIST
stream: the default pipeline end to end, and a SIGKILLed run resumed without loss or double spend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from icdistill.pool import SQLitePool

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def icd(*args: str) -> list[str]:
    return [sys.executable, "-m", "icdistill", "run", *args, "--quiet"]


def test_default_pipeline_short_stream(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(
        icd("--n", "24", "--budget", "0.25", "--warmup", "3", "--out", str(out)),
        capture_output=True, text=True, timeout=900, env=ENV,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accuracy" in r.stdout and "teacher-call rate" in r.stdout and "pool size" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["n_queries"] == 24
    assert 3 <= s["teacher_calls"] <= 0.25 * 24 + 2
    assert s["pool_size"] == s["accepted_annotations"] == s["teacher_calls"]
    assert s["teacher_label_accuracy"] == 1.0  # reference teacher, no noise
    assert s["config"]["student"] == "local:smollm2" and s["config"]["selector"] == "image"
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["position"] for r in log] == list(range(24))
    asked = [r for r in log if r["teacher_asked"]]
    # the re-run with the teacher's fresh demo of the very same image beats the first pass
    assert sum(r["correct"] for r in asked) > sum(r["first_correct"] for r in asked)
    assert all(r["answered_by"] == "student+new-demo" for r in asked)
    later = [r for r in log if r["position"] >= 5]
    assert all(len(r["demo_ids"]) == 2 for r in later)
    assert all(0.0 <= r["uncertainty"] <= 1.0 for r in log)


def test_sigkill_then_resume(tmp_path):
    out = tmp_path / "run"
    args = ("--n", "30", "--budget", "0.2", "--warmup", "3", "--out", str(out))
    proc = subprocess.Popen(icd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    log_path = out / "log.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if log_path.exists() and len(log_path.read_text().splitlines()) >= 8:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(log_path.read_text().splitlines())
    assert 8 <= done_before < 30

    r = subprocess.run(
        icd("--resume", "--out", str(out)), capture_output=True, text=True, timeout=900, env=ENV
    )
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [r["position"] for r in log] == list(range(30))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_queries"] == 30 and summary["resumed_at"] >= 8
    with SQLitePool(out / "pool.sqlite") as pool:
        asked = {r["query_id"] for r in log if r["teacher_asked"]}
        pooled = {d.query_id for d in pool.demos()}
        assert pooled == asked  # every bought annotation is in the pool, and nothing twice
        assert len(pool) == summary["teacher_calls"]

    # a resumed run changes nothing: the student's online state (calibration, what the teacher
    # taught it), the gate and the stream density are replayed from the log
    clean = tmp_path / "clean"
    r = subprocess.run(
        icd(*args[:-1], str(clean)), capture_output=True, text=True, timeout=900, env=ENV
    )
    assert r.returncode == 0, r.stderr[-3000:]
    uninterrupted = [json.loads(x) for x in (clean / "log.jsonl").read_text().splitlines()]
    keys = ("answer", "first_answer", "option_probs", "teacher_asked", "demo_ids", "gate_signals", "uncertainty")
    for a, b in zip(log, uninterrupted, strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["position"]
