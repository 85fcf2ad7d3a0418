import json
import subprocess
import sys

import pytest

from fakes import FakeEmbedder, FakeStudent, colour_folder
from icdistill.cli import main
from icdistill.errors import ICDError
from icdistill.models.reference import ReferenceTeacher
from icdistill.run_summary import plot_run
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
        (["run", "--selector", "cross-modal", "--k-tt", "0"], 2, "--k-tt"),
        (["run", "--n", "x"], 2, "expected a whole number"),
        (["run", "--n", "0"], 2, "--n must be >= 1"),
        (["run", "--gate", "threshold", "--delta", "2"], 2, "--delta 2.0 is outside"),
        (["run", "--pool-max", "3", "--warmup", "5"], 2, "--pool-max 3 is below --warmup 5"),
        (["run", "--resume"], 2, "--resume needs --out"),
        (["run", "--dataset", "/no/such/folder"], 2, "/no/such/folder"),
        (["run", "--dataset", "hf:/no/such/folder"], 2, "/no/such/folder does not exist"),
        (["eval", "--dataset", "/no/such/folder", "--seeds", "0"], 2, "/no/such/folder"),
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


def test_cli_models_lists_specs(monkeypatch):
    from icdistill.models.availability import availability

    monkeypatch.setenv("COLUMNS", "80")
    r = icd("models")  # to a pipe, as into a file
    assert r.returncode == 0 and max(len(line) for line in r.stdout.splitlines()) < 300
    for spec in ("local:smollm2", "reference", "hf:", "openai:"):
        assert spec in r.stdout
    for row in availability():
        assert row["notes"] in r.stdout  # whole, not cut at 80 columns ("efficientnet-lite...")
    assert "…" not in r.stdout


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
    assert s["pool_location"] == str(out / "pool.sqlite") and (out / "pool.sqlite").exists()
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


# --------------------------------------------------------------------------- runs, resume, locking


def fake_parts(teacher=None):
    return Parts(student=FakeStudent(), teacher=teacher or ReferenceTeacher(), embedder=FakeEmbedder())


@pytest.fixture()
def with_fakes(monkeypatch):
    """``icd run`` in-process with fake models (the CLI resolves them through runner.build_parts)."""
    holder = {"teacher": None}
    monkeypatch.setattr("icdistill.runner.build_parts", lambda cfg, ctx=None: fake_parts(holder["teacher"]))
    return holder


def test_second_process_on_a_run_gets_a_clear_error(tmp_path):
    from icdistill.runner import lock_run

    root = colour_folder(tmp_path / "c", n_per_class=3)
    out = tmp_path / "run"
    run_icd(RunConfig(dataset=str(root), n=6), out, parts=fake_parts())
    with lock_run(out):  # this process holds the run: another `icd run --resume` must not write to it
        r = icd("run", "--resume", "--out", str(out), "--quiet")
        assert r.returncode == 1 and "in use by another process" in r.stderr and "Traceback" not in r.stderr
        with pytest.raises(ICDError, match="in use"):
            run_icd(RunConfig(), out, resume=True, parts=fake_parts())
    assert len(read_records(out / "log.jsonl")) == 6  # nothing written twice


def test_resume_refuses_changed_data(tmp_path):
    root = colour_folder(tmp_path / "c", n_per_class=3)
    out = tmp_path / "run"
    run_icd(RunConfig(dataset=str(root), n=12), out, parts=fake_parts())
    colour_folder(root, n_per_class=5, seed=1)  # images added to the dataset folder
    with pytest.raises(ICDError, match="dataset changed"):
        run_icd(RunConfig(n=20), out, resume=True, parts=fake_parts())
    assert len(read_records(out / "log.jsonl")) == 12


def test_resume_extends_n_and_refuses_other_changed_flags(tmp_path, with_fakes, capsys):
    root = colour_folder(tmp_path / "c", n_per_class=5)
    out = tmp_path / "run"
    assert main(["run", "--dataset", str(root), "--n", "12", "--out", str(out), "--quiet"]) == 0
    assert len(read_records(out / "log.jsonl")) == 12
    assert main(["run", "--resume", "--out", str(out), "--budget", "0.3", "--selector", "random"]) == 2
    err = capsys.readouterr().err
    assert "--budget 0.3" in err and "--selector random" in err
    assert main(["run", "--resume", "--out", str(out), "--n", "8"]) == 1  # shorter than what is done
    assert main(["run", "--resume", "--out", str(out), "--n", "300", "--quiet"]) == 0  # the default, given
    recs = read_records(out / "log.jsonl")
    assert [r["position"] for r in recs] == list(range(20))  # the whole 20-image set, nothing twice
    assert json.loads((out / "config.json").read_text())["n"] == 300


def test_resume_from_another_directory_uses_absolute_paths(tmp_path, monkeypatch, with_fakes):
    colour_folder(tmp_path / "data" / "c", n_per_class=3)
    monkeypatch.chdir(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["run", "--dataset", "c", "--n", "6", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["dataset"] == str(tmp_path / "data" / "c")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", "--out", str(out), "--n", "10", "--quiet"]) == 0
    assert len(read_records(out / "log.jsonl")) == 10


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_must_be_a_usable_folder(tmp_path, where, with_fakes, capsys):
    (tmp_path / "f.txt").write_text("x")
    out = tmp_path / "f.txt" if where == "file" else tmp_path / "f.txt" / "run"
    root = colour_folder(tmp_path / "c", n_per_class=2)
    assert main(["run", "--dataset", str(root), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "f.txt" in err and "Traceback" not in err


def test_all_teacher_calls_failed_is_not_a_success(tmp_path, with_fakes, capsys):
    from fakes import FakeTeacher

    with_fakes["teacher"] = FakeTeacher(fail=True)
    root = colour_folder(tmp_path / "c", n_per_class=2)
    code = main(["run", "--dataset", str(root), "--n", "4", "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 1 and "teacher calls failed" in capsys.readouterr().err


def test_ctrl_c_names_the_folder(tmp_path, with_fakes, capsys):
    from fakes import FakeTeacher

    class Interrupting(FakeTeacher):
        def sample(self, query, n):
            raise KeyboardInterrupt

    with_fakes["teacher"] = Interrupting()
    root = colour_folder(tmp_path / "c", n_per_class=2)
    out = tmp_path / "o"
    assert main(["run", "--dataset", str(root), "--n", "4", "--out", str(out), "--quiet"]) == 130
    assert f"--resume --out {out}" in capsys.readouterr().err


def test_a_run_whose_every_input_is_skipped_is_not_a_success(tmp_path, with_fakes, capsys):
    root = colour_folder(tmp_path / "c", n_per_class=2)
    for png in root.rglob("*.png"):
        png.write_bytes(b"not an image")
    out = tmp_path / "o"
    assert main(["run", "--dataset", str(root), "--out", str(out), "--quiet"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "every one of the 8 inputs was skipped" in err and "Traceback" not in err
    assert json.loads((out / "summary.json").read_text())["skipped_inputs"] == 8


def test_ctrl_c_in_an_eval_names_its_folder(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("icdistill.eval.harness.run_eval", interrupted)
    root = colour_folder(tmp_path / "c", n_per_class=2)
    out = tmp_path / "e"
    args = ["eval", "--dataset", str(root), "--methods", "icd", "--seeds", "0", "--n", "4", "--quiet"]
    assert main([*args, "--out", str(out)]) == 130
    assert f"continue with: icd eval --resume --out {out}" in capsys.readouterr().err


def test_warnings_for_settings_that_cannot_be_meant(tmp_path, with_fakes, capsys):
    root = colour_folder(tmp_path / "c", n_per_class=2)
    manifest = tmp_path / "m.jsonl"
    lines = [{"image": str(root / "red" / "0.png"), "label": "red", "options": ["red", "blue"]}]
    lines.append({"image": str(root / "blue" / "0.png"), "options": ["red", "blue"], "lable": "blue"})
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ["run", "--dataset", str(manifest), "--n", "500", "--shots", "0", "--uncertainty", "token-entropy"]
    assert main([*args, "--out", str(tmp_path / "o"), "--quiet"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"1 of 2 items have no label (first: {manifest}:2)" in err
    assert f'{manifest}:2: unknown key "lable" (did you mean "label"?)' in err
    assert "--n 500 but the dataset has 2 items" in err
    assert "--shots 0" in err and "token-entropy on a classification dataset" in err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["unlabelled_queries"] == 1


def test_python_api_writes_the_run_plot(tmp_path):
    root = colour_folder(tmp_path / "c", n_per_class=2)
    run_icd(RunConfig(dataset=str(root), n=6), tmp_path / "o", parts=fake_parts())
    assert (tmp_path / "o" / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_version_and_help_text():
    r = icd("--version")
    assert r.returncode == 0 and r.stdout.startswith("icd ")
    h = icd("run", "--help").stdout
    assert "(default: True)" not in h and "(default: None)" not in h
    e = " ".join(icd("eval", "--help").stdout.split())
    assert "gated methods (default: 0.05)" in e and "stream orders (default: 0,1,2)" in e
    assert e.count("(default: 0.05)") == 1  # once, never followed by "(default: (0.05,))"
    assert "(0.05,)" not in e and "(0, 1, 2)" not in e
    for flag in ("--split", "--no-shuffle", "--k-tt", "--k-it", "--pool-max", "--max-calls", "--max-cost"):
        assert flag in h


def test_bad_spec_value_and_unknown_spec_share_exit_code(tmp_path):
    root = colour_folder(tmp_path / "c", n_per_class=2)
    for spec in ("reference:noise=2", "reference:nosie=0.2"):
        r = icd(
            "run", "--dataset", str(root), "--teacher", spec, "--out", str(tmp_path / spec.replace(":", "_"))
        )
        assert r.returncode == 2 and "Traceback" not in r.stderr, (spec, r.stderr)


def test_a_run_that_never_started_leaves_no_folder(tmp_path, with_fakes):
    out = tmp_path / "o"
    assert main(["run", "--dataset", str(tmp_path / "missing"), "--out", str(out)]) == 2  # a bad command line
    assert not out.exists()


def test_resume_with_the_dataset_moved_or_swapped(tmp_path, with_fakes, capsys):
    import shutil

    root = colour_folder(tmp_path / "c", n_per_class=3)
    out = tmp_path / "run"
    assert main(["run", "--dataset", str(root), "--n", "6", "--out", str(out), "--quiet"]) == 0
    moved = tmp_path / "moved"
    shutil.move(str(root), moved)
    assert main(["run", "--resume", "--out", str(out), "--n", "10", "--quiet"]) == 1  # stored path is gone
    assert main(["run", "--resume", "--out", str(out), "--dataset", str(moved), "--n", "10", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["dataset"] == str(moved)
    other = colour_folder(tmp_path / "other", n_per_class=4)
    capsys.readouterr()
    assert main(["run", "--resume", "--out", str(out), "--dataset", str(other), "--n", "12", "--quiet"]) == 1
    assert "dataset changed" in capsys.readouterr().err
    assert len(read_records(out / "log.jsonl")) == 10


# --------------------------------------------------------------------------- new-user trial (issue 19)


def test_unreachable_teacher_fails_before_the_stream(tmp_path, with_fakes, monkeypatch, capsys):
    import socket

    from icdistill.models.openai_api import OpenAIChatModel

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teacher = OpenAIChatModel("m", f"http://127.0.0.1:{port}/v1", cache=None, retries=4, backoff=5.0)
    student = FakeStudent()
    monkeypatch.setattr(
        "icdistill.runner.build_parts", lambda cfg, ctx=None: Parts(student, teacher, FakeEmbedder())
    )
    root = colour_folder(tmp_path / "c", n_per_class=2)
    out = tmp_path / "o"
    assert main(["run", "--dataset", str(root), "--n", "8", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach http://127.0.0.1:{port}/v1" in err and "Traceback" not in err
    assert student.calls == 0 and teacher.usage.faults == 0  # no query streamed, no call retried
    assert not out.exists()  # nothing blocks the same --out


def test_a_failed_run_can_be_replaced_in_its_folder(tmp_path, with_fakes, capsys):
    from fakes import FakeTeacher

    root = colour_folder(tmp_path / "c", n_per_class=2)
    out = tmp_path / "o"
    args = ["run", "--dataset", str(root), "--n", "4", "--out", str(out), "--quiet"]
    with_fakes["teacher"] = FakeTeacher(fail=True)
    assert main(args) == 1
    assert "run the same command with --replace" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main(args) == 1 and "--replace to start it afresh" in capsys.readouterr().err
    assert main([*args, "--replace", "--resume"]) == 2
    with_fakes["teacher"] = None  # the teacher is fixed
    assert main([*args, "--replace"]) == 0
    recs = read_records(out / "log.jsonl")
    assert len(recs) == 4 and all(r.get("teacher_error") is None for r in recs)
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files go


def test_summary_names_teacher_quality_skips_and_the_zero_shot_comparison(tmp_path):
    import io

    from rich.console import Console

    from fakes import FakeTeacher
    from icdistill.report import print_summary

    root = colour_folder(tmp_path / "c", n_per_class=3)
    for i in range(7):
        (root / "red" / f"bad{i}.png").write_bytes(b"not a png")
    # plain ICL: a judge would learn from the always-wrong teacher to follow its (wrong) demos
    cfg = RunConfig(dataset=str(root), n=None, budget=0.5, warmup=12, shots=1, seed=1, judge="off")
    class KnowingStudent(FakeStudent):  # right on its own, whatever the demos say
        def predict(self, query, demos):
            pred = super().predict(query, [])
            pred.answer = query.label
            pred.option_scores = {o: 2.0 if o == query.label else 0.0 for o in query.options}
            return pred

    bad_teacher = FakeTeacher(wrong_every=1)  # every answer another option than the label
    s = run_icd(cfg, tmp_path / "o", parts=Parts(KnowingStudent(), bad_teacher, FakeEmbedder()))
    assert s["skipped_inputs"] == 7 and len(s["skipped_first"]) == 5
    assert s["mean_uncertainty_by_kind"].keys() == {"options"}
    buf = io.StringIO()
    print_summary(s, tmp_path / "o", Console(file=buf, width=100))
    text = buf.getvalue()
    flat = " ".join(text.split())
    assert "teacher label accuracy" in text and "0.000" in text
    assert "the teacher's answers matched the labels only 0% of the time" in flat
    assert "(the student's own, before the teacher: 100%)" in flat
    assert "skipped inputs (first 5 of 7):" in text
    first = s["skipped_first"][0]
    assert f"position {first['position']}: {first['error']}" in flat and "bad" in first["error"]
    hint = f"icd eval --dataset {root} --n all --shots 1 --judge off --warmup 12 --methods student-zero-shot,icd --budgets 0.5 --seeds 1"
    assert hint in flat
    import shlex

    from icdistill.cli import build_parser

    args = build_parser().parse_args(shlex.split(hint)[1:])  # the command runs as printed
    assert (args.n, args.shots, args.warmup, args.budgets, args.seeds) == (None, 1, 12, (0.5,), (1,))
    assert "mean uncertainty (option questions, entropy 0-1)" in text
    from icdistill.report import teacher_warning

    fair = {"accepted_annotations": 10, "rejected_annotations": 0, "first_pass_accuracy": 0.55}
    assert teacher_warning({**fair, "teacher_label_accuracy": 0.6}) is None
    assert teacher_warning({**fair, "teacher_label_accuracy": 0.4}) is not None  # wrong more than right
    assert teacher_warning({**fair, "first_pass_accuracy": 0.8, "teacher_label_accuracy": 0.6}) is not None
    # too few answers to compare rates, but none matched: said with its counts (issue 28, item 7)
    few = teacher_warning({**fair, "accepted_annotations": 2, "teacher_label_accuracy": 0.0})
    assert few is not None and few.startswith("only 0 of 2 teacher answers matched the labels")


def test_run_plot_keeps_lines_inside_and_counts_calls_in_whole_numbers(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    shown = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (shown.append(fig), close(fig)))
    root = colour_folder(tmp_path / "c", n_per_class=2)
    s = run_icd(RunConfig(dataset=str(root), n=8, budget=0.2, warmup=3), tmp_path / "o", parts=fake_parts())
    assert s["teacher_calls"] >= 3
    ax, ax2 = shown[-1].axes
    low, high = ax.get_ylim()
    assert low < 0 and high > 1  # a running accuracy of 1.0 is not drawn on the frame
    ticks = [t for t in ax2.get_yticks() if ax2.get_ylim()[0] <= t <= ax2.get_ylim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    labels = [line.get_label() for line in ax.get_lines()]
    assert "accuracy (student's first pass, with demos)" in labels


def test_progress_says_models_load_before_the_first_query():
    import io

    from rich.console import Console

    from icdistill.report import STARTING, progress_callbacks

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=140)
    with progress_callbacks(console) as (on_start, on_record):
        on_start(0, 40)
    assert "0/40" in buf.getvalue() and STARTING in buf.getvalue()
    buf = io.StringIO()
    with progress_callbacks(Console(file=buf, force_terminal=True, width=140)) as (on_start, on_record):
        on_start(0, 40)
        on_record({"event": "query", "correct": True, "teacher_asked": True, "pool_size": 1})
    last = buf.getvalue().rsplit("\r", 1)[-1]
    assert "1/40" in last and "acc 1.000" in last and STARTING not in last and "this session" not in last
    # a resumed run: the bar counts the whole run, its accuracy and calls are this session's, and say so
    buf = io.StringIO()
    with progress_callbacks(Console(file=buf, force_terminal=True, width=140)) as (on_start, on_record):
        on_start(30, 40)
        on_record({"event": "query", "correct": False, "teacher_asked": False, "pool_size": 9})
    last = buf.getvalue().rsplit("\r", 1)[-1]
    assert "31/40" in last and "acc 0.000  teacher 0 (0.0%) this session  pool 9" in last


def test_serve_model_says_what_it_serves(monkeypatch, capsys):
    import socket

    from icdistill import serve_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ran = []
    monkeypatch.setattr("icdistill.models.registry.resolve_student", lambda spec, ctx=None: FakeStudent())
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: ran.append(kw))
    serve_model.main("local:smollm2", port=port)
    err = capsys.readouterr().err
    assert "icd serve-model: loading local:smollm2" in err
    assert f"serving fake-student and local:smollm2 at http://127.0.0.1:{port}/v1" in err
    assert ran and ran[0]["port"] == port
    with pytest.raises(ICDError, match="cannot be served by icd serve-model: scheme 'reference' can only be teacher") as e:
        serve_model.main("reference", port=port)
    assert "student" not in str(e.value) and "use local:, hf:, openai:" in str(e.value)


def test_counts_in_warnings_agree_with_their_noun(tmp_path, with_fakes, capsys):
    root = colour_folder(tmp_path / "c", n_per_class=2)
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps({"image": str(root / "red" / "0.png"), "label": "red"}) + "\n")
    assert main(["run", "--dataset", str(manifest), "--n", "3", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "the dataset has 1 item: the stream has 1" in err


def test_a_run_stored_before_the_gate_score_existed_resumes_ranking_by_uncertainty(tmp_path):
    import json as _json

    from icdistill.runner import RunConfig, stored_config, write_json_atomic

    (tmp_path / "old").mkdir()
    old = {k: v for k, v in vars(RunConfig()).items() if k != "gate_score"}
    write_json_atomic(tmp_path / "old" / "config.json", old)
    assert stored_config(tmp_path / "old").gate_score == "uncertainty"
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.json").write_text(_json.dumps({**old, "gate_score": "coverage"}))
    assert stored_config(tmp_path / "new").gate_score == "coverage"
