"""The stream driver (``icdistill.flow``): teacher calls in flight and micro-batched student passes.

The teacher is a real OpenAI-compatible server on 127.0.0.1 (``slow_teacher.SlowTeacher``) that
records what it is asked and how many requests are open at once; tests wait on those events, never
on the clock."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fakes import FakeEmbedder, FakeStudent, FakeTeacher, LocalServer, colour_folder, wait_for
from flow_worker import teacher_spec
from icdistill.data.stream import load_dataset, stream_order
from icdistill.distiller import Distiller
from icdistill.errors import ICDError, TeacherUnavailable
from icdistill.flow import run_stream
from icdistill.gate import make_gate
from icdistill.models.reference import ReferenceTeacher
from icdistill.models.registry import ModelContext, resolve_teacher
from icdistill.pool import SQLitePool
from icdistill.runlog import RunLog, read_records
from icdistill.runner import Parts, RunConfig, query_stream, run_icd
from icdistill.select import make_selector
from icdistill.teacher import TestTimeScaling
from slow_teacher import SlowTeacher

WORKER = Path(__file__).resolve().parent / "flow_worker.py"
KEYS = ("answer", "first_answer", "option_probs", "teacher_asked", "demo_ids", "gate_signals", "uncertainty")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("flow") / "colours", n_per_class=6)


def _cfg(data: Path, **kw) -> RunConfig:
    base = dict(
        student="fake", teacher="reference", embedder="fake", dataset=str(data), n=24, warmup=2, shots=2
    )
    return RunConfig(**(base | kw))


def _log(out: Path) -> list[dict]:
    return read_records(out / "log.jsonl")


def _run(cfg: RunConfig, out: Path, teacher=None) -> list[dict]:
    run_icd(cfg, out, parts=Parts(FakeStudent(), teacher or ReferenceTeacher(), FakeEmbedder()))
    return _log(out)


def _step_by_step(cfg: RunConfig, out: Path) -> list[dict]:
    """The loop before the driver: ``Distiller.step`` one query at a time."""
    dataset = load_dataset(str(cfg.dataset))
    order = stream_order(len(dataset), cfg.n, cfg.seed, cfg.shuffle)
    with SQLitePool(out / "pool.sqlite") as pool:
        d = Distiller(
            FakeStudent(),
            TestTimeScaling(ReferenceTeacher()),
            FakeEmbedder(),
            make_selector(cfg.selector, seed=cfg.seed),
            make_gate(cfg.gate, budget=cfg.budget, warmup=cfg.warmup, score=cfg.gate_score, seed=cfg.seed),
            pool,
            cfg.loop_config(),
        )
        return [d.step(q) for q in query_stream(dataset, order)]  # type: ignore[arg-type]


def test_concurrency_1_batch_1_answers_as_the_loop_always_did(data: Path, tmp_path: Path) -> None:
    (tmp_path / "loop").mkdir()
    before = _step_by_step(_cfg(data), tmp_path / "loop")
    after = _run(_cfg(data, teacher_concurrency=1, batch=1), tmp_path / "run")
    assert any(r["teacher_asked"] for r in after)
    assert [{k: r[k] for k in KEYS} for r in after] == [{k: r[k] for k in KEYS} for r in before]
    assert all("in_flight" not in r for r in after)


def test_batches_and_calls_in_flight_keep_answers_when_the_pool_does_not_change(
    data: Path, tmp_path: Path
) -> None:
    # with no teacher call nothing changes the pool mid-batch: every setting answers alike
    ref = _run(_cfg(data, gate="never"), tmp_path / "ref")
    for c, b in ((1, 4), (4, 1), (3, 5)):
        got = _run(_cfg(data, gate="never", teacher_concurrency=c, batch=b), tmp_path / f"c{c}b{b}")
        assert [{k: r[k] for k in KEYS} for r in got] == [{k: r[k] for k in KEYS} for r in ref], (c, b)


def test_calls_overlap_at_the_server_and_the_log_stays_in_order(data: Path, tmp_path: Path) -> None:
    teacher = SlowTeacher()
    teacher.hold()  # no answer until four calls are open at once
    out = tmp_path / "run"
    cfg = _cfg(data, gate="always", n=16, teacher_concurrency=4)
    errors: list[BaseException] = []
    with LocalServer(teacher.app) as url:
        parts = Parts(FakeStudent(), resolve_teacher(teacher_spec(url), ModelContext()), FakeEmbedder())

        def go() -> None:
            try:
                run_icd(cfg, out, parts=parts)
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)

        worker = threading.Thread(target=go)
        worker.start()
        wait_for(lambda: teacher.open == 4 or errors, "four teacher calls open at once")
        teacher.release()
        worker.join(timeout=600)
    assert not errors, errors
    assert teacher.max_open == 4  # C calls in flight, never more
    log = _log(out)
    assert [r["position"] for r in log] == list(range(16))
    assert all(r["teacher_asked"] and r["annotation"]["accepted"] for r in log)
    assert any(r.get("in_flight") for r in log)  # written while calls were still in flight
    assert len(teacher.asked) == len(set(teacher.asked)) == 16  # each image bought once
    with SQLitePool(out / "pool.sqlite") as pool:
        assert {d.query_id for d in pool.demos()} == {r["query_id"] for r in log}


def test_concurrency_1_waits_for_each_call(data: Path, tmp_path: Path) -> None:
    teacher = SlowTeacher()
    with LocalServer(teacher.app) as url:
        parts = Parts(FakeStudent(), resolve_teacher(teacher_spec(url), ModelContext()), FakeEmbedder())
        run_icd(_cfg(data, gate="always", n=8, batch=3), tmp_path / "run", parts=parts)
    assert teacher.max_open == 1 and len(teacher.asked) == 8


def test_teacher_failures_stop_in_position_order(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _cfg(data, gate="always", max_teacher_failures=3, teacher_concurrency=4, batch=2)
    with pytest.raises(TeacherUnavailable, match="failed 3 times in a row"):
        _run(cfg, out, teacher=FakeTeacher(fail=True))
    assert [r["position"] for r in _log(out)] == [0, 1]  # the third failure is not logged


def test_bad_knobs_are_refused(data: Path) -> None:
    with pytest.raises(ICDError, match="--teacher-concurrency"):
        _cfg(data, teacher_concurrency=0)
    with pytest.raises(ICDError, match="--batch"):
        _cfg(data, batch=0)


def test_run_stream_without_a_log_returns_records(data: Path, tmp_path: Path) -> None:
    dataset = load_dataset(str(data))
    order = stream_order(len(dataset), 10, 0, True)
    with SQLitePool(tmp_path / "pool.sqlite") as pool, RunLog(tmp_path / "log.jsonl") as log:
        d = Distiller(
            FakeStudent(), TestTimeScaling(ReferenceTeacher()), FakeEmbedder(), make_selector("image"),
            make_gate("always"), pool, log=log,
        )  # fmt: skip
        recs = run_stream(d, query_stream(dataset, order), teacher_concurrency=3, batch=4)
    assert [r["position"] for r in recs] == list(range(10))
    assert [r["position"] for r in _log(tmp_path)] == list(range(10))


def _pooled(out: Path) -> int:
    path = out / "pool.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
            return int(db.execute("SELECT count(*) FROM annotations").fetchone()[0])
    except sqlite3.OperationalError:  # the table is not there yet
        return 0


def test_sigkill_with_calls_in_flight_then_resume(data: Path, tmp_path: Path) -> None:
    n, held = 16, {5, 9}  # the 6th and 10th requests get no answer before the kill
    teacher = SlowTeacher()
    teacher.hold_arrivals(held)
    out = tmp_path / "run"
    worker = [sys.executable, str(WORKER), str(data), str(out)]
    with LocalServer(teacher.app) as url:
        proc = subprocess.Popen([*worker, url, "fresh", "4", str(n), "always"], stderr=subprocess.PIPE)
        try:
            # every other call answered and committed; the two held calls in flight
            wait_for(lambda: len(teacher.answered) == n - 2 and _pooled(out) == n - 2 or proc.poll() is not None,
                     "all but the held calls answered and pooled")  # fmt: skip
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
            assert teacher.open == 2
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        logged = _log(out)
        held_keys = {teacher.asked[i] for i in held}
        # the log is a prefix of the stream: it stops before the first held call's position
        assert [r["position"] for r in logged] == list(range(len(logged))) and 4 <= len(logged) <= 9
        before = len(teacher.asked)
        teacher.release()
        r = subprocess.run([*worker, url, "resume", "4", str(n), "always"], capture_output=True, timeout=600)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
    again = teacher.asked[before:]
    assert sorted(again) == sorted(held_keys)  # asked again: only what was never committed
    log = _log(out)
    assert [r["position"] for r in log] == list(range(n))  # every position logged once
    recovered = [r for r in log if r["gate_reason"] == "recovered from pool after a crash"]
    assert len(recovered) == n - 2 - len(logged)  # bought before the kill, logged after it
    with SQLitePool(out / "pool.sqlite") as pool:
        assert len(pool) == n and {d.query_id for d in pool.demos()} == {r["query_id"] for r in log}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_queries"] == n and summary["teacher_calls"] == n


def test_progress_bar_shows_calls_in_flight() -> None:
    from rich.console import Console

    from icdistill.report import progress_callbacks

    console = Console(record=True, width=200, force_terminal=True)
    rec = {"event": "query", "correct": True, "teacher_asked": True, "pool_size": 1, "in_flight": 3}
    with progress_callbacks(console) as (on_start, on_record):
        on_start(0, 2)
        on_record(rec)
    assert "in flight 3" in console.export_text()


def test_calls_in_flight_on_a_shared_pool_are_refused_clearly(data: Path) -> None:
    with pytest.raises(ICDError, match="not supported yet"):
        _cfg(data, pool="postgresql://localhost/icd", teacher_concurrency=4)
    _cfg(data, pool="postgresql://localhost/icd", teacher_concurrency=1, batch=8)  # batches are fine


def test_cli_flags_are_validated_and_a_resume_may_change_them(
    data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from icdistill.cli import main

    parts = lambda cfg, ctx=None: Parts(FakeStudent(), ReferenceTeacher(), FakeEmbedder())  # noqa: E731
    monkeypatch.setattr("icdistill.runner.build_parts", parts)
    out = tmp_path / "run"
    base = ["run", "--dataset", str(data), "--out", str(out), "--quiet"]
    assert main([*base, "--teacher-concurrency", "0"]) == 2
    assert "--teacher-concurrency must be" in capsys.readouterr().err
    assert main([*base, "--batch", "0"]) == 2
    assert main([*base, "--n", "10", "--teacher-concurrency", "3", "--batch", "4"]) == 0
    stored = json.loads((out / "config.json").read_text())
    assert (stored["teacher_concurrency"], stored["batch"]) == (3, 4)
    # speed knobs, not the run's definition: a resume may change them
    assert main(["run", "--resume", "--out", str(out), "--n", "20", "--batch", "2", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["batch"] == 2
    assert [r["position"] for r in _log(out)] == list(range(20))


def test_a_repeated_image_is_bought_once_with_calls_in_flight(tmp_path: Path) -> None:
    import shutil

    root = colour_folder(tmp_path / "colours", n_per_class=1)
    for i in range(1, 4):  # the same red image four times in the stream
        shutil.copy(root / "red" / "0.png", root / "red" / f"{i}.png")
    teacher = SlowTeacher()
    teacher.hold()
    out = tmp_path / "run"
    with LocalServer(teacher.app) as url:
        parts = Parts(FakeStudent(), resolve_teacher(teacher_spec(url), ModelContext()), FakeEmbedder())
        worker = threading.Thread(
            target=run_icd,
            args=(_cfg(root, gate="always", n=7, teacher_concurrency=4), out),
            kwargs={"parts": parts},
        )
        worker.start()
        wait_for(lambda: teacher.open >= 1, "a first teacher call")
        teacher.release()
        worker.join(timeout=600)
    assert len(teacher.asked) == len(set(teacher.asked)) == 4  # four distinct images, each bought once
    log = _log(out)
    assert [r["position"] for r in log] == list(range(7))
    reds = [r for r in log if r["label"] == "red"]
    assert sum(r["teacher_asked"] for r in reds) == 1
    assert all("same image and prompt" in r["gate_reason"] for r in reds if not r["teacher_asked"])
