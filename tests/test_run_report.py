"""The run summary's worst-labels table as a user reads it in an 80-column terminal or a pipe."""

import io

from rich.console import Console

from icdistill.report import print_groups


def _group(n: int, acc: float) -> dict:
    return {"n": n, "accuracy": acc, "first_pass_accuracy": acc, "student_only_accuracy": acc, "teacher_calls": 1}


def test_worst_labels_stay_on_one_line_and_the_never_pooled_label_is_warned_about():
    summary = {
        "per_label": {
            "T-shirt/top": _group(33, 0.273),
            "Pullover": _group(30, 0.0),
            "Trouser": _group(23, 0.478),
            "Ankle boot": _group(31, 0.9),
        },
        "never_pooled_labels": {"Pullover": 30},
    }
    out = io.StringIO()
    print_groups(summary, Console(file=out, width=80, force_terminal=False, color_system=None))
    text = out.getvalue()
    rows = [line for line in text.splitlines() if "label:" in line]
    # worst first, each label's name whole on its row, with its numbers
    assert [r.split("label: ")[1].split("│")[0].strip() for r in rows[:3]] == ["Pullover", "T-shirt/top", "Trouser"]
    assert "0.273" in rows[1] and "33" in rows[1]
    assert "label 'Pullover' came 30 times but never entered the pool" in text.replace("\n", " ")
    # with the run's config, the warning names the whole icd eval command that compares it
    from dataclasses import asdict

    from icdistill.runner import RunConfig

    summary["config"] = asdict(RunConfig(dataset="fashion-mnist", n=300))
    out = io.StringIO()
    print_groups(summary, Console(file=out, width=80, force_terminal=False, color_system=None))
    warning = " ".join(out.getvalue().split()).split("never entered the pool")[1]
    assert "icd eval --dataset fashion-mnist" in warning and "--methods student-zero-shot,icd" in warning


def test_an_always_wrong_teacher_on_a_short_stream_is_warned_about_with_its_counts(tmp_path, monkeypatch, capsys):
    # 3 teacher answers (the warm-up), none right: too few for rates, but the counts say enough
    from fakes import FakeEmbedder, FakeStudent, FakeTeacher, colour_folder
    from icdistill.cli import main
    from icdistill.runner import Parts

    teacher = FakeTeacher(wrong_every=1)
    monkeypatch.setattr(
        "icdistill.runner.build_parts", lambda cfg, ctx=None: Parts(FakeStudent(), teacher, FakeEmbedder())
    )
    root = colour_folder(tmp_path / "c", n_per_class=2)
    args = ["run", "--dataset", str(root), "--n", "8", "--warmup", "4", "--budget", "0.1"]
    assert main([*args, "--out", str(tmp_path / "o"), "--quiet"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "only 0 of 3 teacher answers matched the labels" in text


def test_a_short_teacher_record_that_mostly_matches_is_not_warned_about():
    from icdistill.report import teacher_warning

    base = {"first_pass_accuracy": 0.8, "accepted_annotations": 4, "rejected_annotations": 0}
    assert teacher_warning({**base, "teacher_label_accuracy": 0.75, "teacher_label_checked": 4}) is None
    said = teacher_warning({**base, "teacher_label_accuracy": 0.25, "teacher_label_checked": 4})
    assert said is not None and "only 1 of 4 teacher answers" in said


def test_warnings_written_to_a_file_are_whole_lines(tmp_path, monkeypatch, capsys):
    # stderr to a file: rich cut the warnings at 80 columns
    from fakes import FakeEmbedder, FakeStudent, colour_folder
    from icdistill.cli import main
    from icdistill.models.reference import ReferenceTeacher
    from icdistill.runner import Parts

    monkeypatch.setattr(
        "icdistill.runner.build_parts",
        lambda cfg, ctx=None: Parts(FakeStudent(), ReferenceTeacher(), FakeEmbedder()),
    )
    root = colour_folder(tmp_path / "c", n_per_class=2)
    assert main(["run", "--dataset", str(root), "--n", "4", "--shots", "0", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    lines = capsys.readouterr().err.splitlines()
    said = next(x for x in lines if x.startswith("icd: warning: --shots 0"))
    assert len(said) > 80 and said.endswith("use --gate never for zero-shot")
