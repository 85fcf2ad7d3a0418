"""What a run's folder says about it: config.json's split is the one read; a refused --resume names
the way to start afresh."""

from __future__ import annotations

import json

import pytest

from fakes import FakeEmbedder, FakeStudent, colour_folder
from icdistill.cli import main
from icdistill.models.reference import ReferenceTeacher
from icdistill.runlog import read_records
from icdistill.runner import Parts, RunConfig, run_icd


def _parts() -> Parts:
    return Parts(FakeStudent(), ReferenceTeacher(), FakeEmbedder())


def test_config_json_says_no_split_for_a_folder_and_resumes(tmp_path):
    root = colour_folder(tmp_path / "c", n_per_class=2)
    out = tmp_path / "o"
    run_icd(RunConfig(dataset=str(root), n=4), out, parts=_parts())
    assert json.loads((out / "config.json").read_text())["split"] is None  # not "test"
    run_icd(RunConfig(dataset=str(root), n=8), out, resume=True, parts=_parts())
    assert len(read_records(out / "log.jsonl")) == 8


def test_config_json_says_the_split_a_hugging_face_set_was_read_from(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8), (60 * i, 0, 0)) for i in range(4)], "label": [0, 1, 0, 1]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}
        ),
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))  # only a train split
    out = tmp_path / "o"
    run_icd(
        RunConfig(dataset=f"hf:{tmp_path / 'saved'}", n=2), out, parts=_parts()
    )  # --split test, the default
    assert json.loads((out / "config.json").read_text())["split"] == "train"
    run_icd(RunConfig(dataset=f"hf:{tmp_path / 'saved'}", n=4), out, resume=True, parts=_parts())
    assert len(read_records(out / "log.jsonl")) == 4


def test_a_resume_refused_for_a_changed_flag_names_replace(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("icdistill.runner.build_parts", lambda cfg, ctx=None: _parts())
    root = colour_folder(tmp_path / "c", n_per_class=2)
    out = tmp_path / "o"
    assert main(["run", "--dataset", str(root), "--n", "4", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", "--out", str(out), "--budget", "0.3"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--budget 0.3" in err and "run the same command with --replace instead of --resume" in err


class _TypedStudent(FakeStudent):
    """A FakeStudent that reports the dtype it runs in, as local:smollm2 and hf: students do."""

    def __init__(self, dtype: str) -> None:
        super().__init__()
        self.dtype = dtype


def test_a_resume_in_another_dtype_than_the_run_started_in_is_warned(tmp_path, monkeypatch, capsys):
    root = colour_folder(tmp_path / "c", n_per_class=2)
    out = tmp_path / "o"
    student = _TypedStudent("bfloat16")
    monkeypatch.setattr(
        "icdistill.runner.build_parts",
        lambda cfg, ctx=None: Parts(student, ReferenceTeacher(), FakeEmbedder()),
    )
    assert main(["run", "--dataset", str(root), "--n", "4", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["student_dtype"] == "bfloat16"
    assert json.loads((out / "summary.json").read_text())["student_dtype"] == "bfloat16"
    capsys.readouterr()
    assert main(["run", "--resume", "--out", str(out), "--n", "6", "--quiet"]) == 0  # the same machine
    assert "resumes in" not in "".join(capsys.readouterr())
    student.dtype = "float32"  # another machine's default
    assert main(["run", "--resume", "--out", str(out), "--n", "8", "--quiet"]) == 0
    said = " ".join("".join(capsys.readouterr()).split())
    assert "started with its student in bfloat16 and resumes in float32" in said and "dtype=bfloat16" in said
    assert len(read_records(out / "log.jsonl")) == 8
