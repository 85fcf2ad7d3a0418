import json

from fakes import FakeEmbedder, FakeStudent, colour_folder
from icdistill.eval.harness import EvalConfig, run_eval
from icdistill.models.reference import ReferenceTeacher
from icdistill.runner import Parts, RunConfig


def test_an_eval_started_with_a_relative_dataset_resumes_from_another_directory(tmp_path, monkeypatch):
    colour_folder(tmp_path / "photos", n_per_class=4)
    monkeypatch.chdir(tmp_path)
    cfg = EvalConfig(base=RunConfig(dataset="photos/", n=8, warmup=1), methods=("icd",), seeds=(0,))
    student = FakeStudent()
    parts = Parts(student, ReferenceTeacher(), FakeEmbedder())
    rows = run_eval(cfg, tmp_path / "out", parts=parts)
    stored = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert stored["base"]["dataset"] == str((tmp_path / "photos").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # the dataset is read from eval.json (not passed in): a relative path would not be found here
    again = run_eval(cfg, tmp_path / "out", resume=True, parts=parts)
    assert again == rows


def test_the_report_names_no_split_for_a_folder(tmp_path):
    # report.md said "(test)" for a folder, which has no splits
    data = colour_folder(tmp_path / "photos", n_per_class=2)
    cfg = EvalConfig(base=RunConfig(dataset=str(data), n=4, warmup=1), methods=("student-zero-shot",), seeds=(0,))
    run_eval(cfg, tmp_path / "out", parts=Parts(FakeStudent(), ReferenceTeacher(), FakeEmbedder()))
    head = (tmp_path / "out" / "report.md").read_text().splitlines()[2]
    assert head.startswith(f"Dataset `{data}`, 4 queries per stream") and "(test)" not in head
