"""What `icd eval` says at the start about the dataset (the same warnings as `icd run`)."""

import pytest

from fakes import FakeEmbedder, FakeStudent, colour_folder
from icdistill.eval.harness import EvalConfig, run_eval
from icdistill.models.reference import ReferenceTeacher
from icdistill.runner import Parts, RunConfig

datasets = pytest.importorskip("datasets")


def test_eval_says_at_the_start_that_text_labels_make_open_questions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from PIL import Image

    names = ["car", "car", "tree", "tree"]
    images = [Image.new("RGB", (8, 8), (40 * i, 10, 10)) for i in range(4)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": names},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}),
    )
    ds.to_parquet(str(tmp_path / "photos.parquet"))
    cfg = EvalConfig(
        base=RunConfig(dataset=f"hf:{tmp_path / 'photos.parquet'}", n=4, warmup=1),
        methods=("student-zero-shot",),
        seeds=(0,),
    )
    said: list[str] = []
    events: list[str] = []
    parts = Parts(FakeStudent(), ReferenceTeacher(), FakeEmbedder())
    run_eval(
        cfg,
        tmp_path / "out",
        parts=parts,
        on_warning=lambda w: (said.append(w), events.append("warning")),
        on_cell=lambda i, n, c: events.append("cell"),
    )
    assert events[0] == "warning"  # before any cell runs
    (warning,) = said
    assert "holds text, not classes: the questions are open" in warning and "options=labels" in warning


def test_eval_passes_on_a_folder_dataset_warning(tmp_path):
    data = colour_folder(tmp_path / "c", n_per_class=2)
    (data / "red" / "notes.txt").write_text("not an image")
    cfg = EvalConfig(base=RunConfig(dataset=str(data), n=4, warmup=1), methods=("student-zero-shot",), seeds=(0,))
    said: list[str] = []
    run_eval(cfg, tmp_path / "out", parts=Parts(FakeStudent(), ReferenceTeacher(), FakeEmbedder()), on_warning=said.append)
    assert len(said) == 1 and "notes.txt" in said[0]
