"""``--dataset hf:...``: Hugging Face datasets built on disk in the test (save_to_disk, parquet, cache)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icdistill.data.stream import absolute_source, load_dataset
from icdistill.errors import DataError, MissingDataset

datasets = pytest.importorskip("datasets")

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}


@pytest.fixture(autouse=True)
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The datasets cache in the test's folder, and no download whatever the environment says."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return cache


def colours(n_per_class: int = 2, extra: dict | None = None):
    """A small image classification dataset: a 16-bit grey, an RGBA and RGB images; ClassLabel labels."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for k, rgb in enumerate(COLOURS.values()):
        for _ in range(n_per_class):
            arr = np.clip(np.array(rgb) + rng.normal(0, 10, (12, 12, 3)), 0, 255).astype(np.uint8)
            images.append(Image.fromarray(arr))
            labels.append(k)
    images[1] = images[1].convert("RGBA")
    features = {"img": datasets.Image(), "label": datasets.ClassLabel(names=list(COLOURS))}
    columns = {"img": images, "label": labels}
    for name, (values, feature) in (extra or {}).items():
        columns[name], features[name] = values, feature
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def test_saved_to_disk_with_class_labels_as_options(tmp_path: Path) -> None:
    ds = colours()
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "saved"))
    train = load_dataset(f"hf:{tmp_path / 'saved'}?split=train")
    assert len(train) == 6 and train.options == ("red", "green", "blue")
    assert train.labels() == ["red", "red", "green", "green", "blue", "blue"]
    q = train.item(1)
    assert q.label == "red" and q.options == ("red", "green", "blue") and q.image.mode == "RGB"
    assert q.id == "train/1" and train.warnings == []
    test = load_dataset(f"hf:{tmp_path / 'saved'}", split="test")  # the run's --split
    assert len(test) == 3
    assert train.fingerprint() == load_dataset(f"hf:{tmp_path / 'saved'}?split=train").fingerprint()
    assert train.fingerprint() != test.fingerprint()


def test_parquet_file_and_folder_with_named_columns(tmp_path: Path) -> None:
    ds = colours(
        extra={
            "question": (["Which colour?"] * 6, datasets.Value("string")),
            "caption": ([f"a {c} square" for c in COLOURS for _ in range(2)], datasets.Value("string")),
        }
    )
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    one = load_dataset(f"hf:{tmp_path / 'pq' / 'train.parquet'}?image=img&label=caption&prompt=question")
    assert one.options is None  # a text label: open questions
    q = one.item(2)
    assert (q.prompt, q.label, q.options) == ("Which colour?", "a green square", None)
    folder = load_dataset(f"hf:{tmp_path / 'pq'}?prompt='Name the colour, please.'")
    assert folder.item(0).prompt == "Name the colour, please." and folder.options == tuple(COLOURS)


def test_per_row_options_and_unlabelled_rows(tmp_path: Path) -> None:
    opts = [["red", "not red"]] * 6
    labels = ["red", "red", "not red", "not red", None, "not red"]
    ds = colours(
        extra={
            "choices": (opts, datasets.List(datasets.Value("string"))),
            "answer": (labels, datasets.Value("string")),
        }
    )
    ds.save_to_disk(str(tmp_path / "yn"))
    yn = load_dataset(f"hf:{tmp_path / 'yn'}?label=answer&options=choices")
    assert yn.options == ("red", "not red") and yn.labels()[4] == "" and yn.where(4) == "yn train[4]"
    bad = colours(extra={"choices": ([["a", "b"]] * 6, datasets.List(datasets.Value("string")))})
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"row 0: label 'red' is not among its options \['a', 'b'\]"):
        load_dataset(f"hf:{tmp_path / 'bad'}?options=choices")


def test_errors_are_one_line_and_name_what_exists(tmp_path: Path) -> None:
    ds = colours()
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "two"))
    cases = [
        (f"hf:{tmp_path / 'two'}", "has splits train, validation: choose one with split="),
        (f"hf:{tmp_path / 'two'}?split=dev", "no split 'dev'; its splits: train, validation"),
        (f"hf:{tmp_path / 'two'}?split=train&image=picture", "no column 'picture' for image=; columns: img, label"),
        (f"hf:{tmp_path / 'two'}?split=train&labels=x", "unknown key(s) labels"),
        ("hf:no-such-user/no-such-dataset", "not in the local cache and downloads are off"),
    ]
    for source, message in cases:
        with pytest.raises(DataError) as e:
            load_dataset(source)
        assert message in str(e.value) and "\n" not in str(e.value), (source, str(e.value))
    with pytest.raises(MissingDataset):
        load_dataset(f"hf:{tmp_path / 'missing'}")
    two_images = colours(extra={"thumb": (list(ds["img"]), datasets.Image())})
    two_images.save_to_disk(str(tmp_path / "thumbs"))
    with pytest.raises(DataError, match=r"2 image columns \(img, thumb\): name one with image="):
        load_dataset(f"hf:{tmp_path / 'thumbs'}")
    assert len(load_dataset(f"hf:{tmp_path / 'thumbs'}?image=thumb")) == 6


def test_a_dataset_in_the_local_cache_by_name(tmp_path: Path, offline_cache: Path) -> None:
    """What a download once left in the datasets cache (<user>___<name>/<config>/<version>/<hash>)
    loads by its name with downloads off."""
    import shutil

    colours().to_parquet(str(tmp_path / "train.parquet"))
    datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "train.parquet")})
    built = next(p for p in (offline_cache / "parquet").glob("*/*/*") if p.is_dir())
    cached = offline_cache / "someone___colours" / "default" / "0.0.0" / "abc123"
    shutil.copytree(built, cached)
    (cached / "parquet-train.arrow").rename(cached / "colours-train.arrow")
    ds = load_dataset("hf:someone/colours", split="test")  # its only split, whatever --split says
    assert len(ds) == 6 and ds.options == tuple(COLOURS) and ds.item(5).label == "blue"


def test_cached_name_and_relative_path_for_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    colours().save_to_disk(str(tmp_path / "c"))
    monkeypatch.chdir(tmp_path)
    assert absolute_source("hf:./c?split=train") == f"hf:{tmp_path / 'c'}?split=train"
    assert absolute_source("hf:someone/cached-set") == "hf:someone/cached-set"  # a name, not a path
    assert len(load_dataset("hf:./c")) == 6


def test_icd_run_on_an_hf_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fakes import FakeEmbedder, FakeStudent
    from icdistill.cli import main
    from icdistill.models.reference import ReferenceTeacher
    from icdistill.runner import Parts

    monkeypatch.setattr(
        "icdistill.runner.build_parts",
        lambda cfg, ctx=None: Parts(FakeStudent(), ReferenceTeacher(), FakeEmbedder()),
    )
    colours(n_per_class=3).save_to_disk(str(tmp_path / "c"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["run", "--dataset", "hf:c?split=train", "--n", "5", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == f"hf:{tmp_path / 'c'}?split=train"
    assert config["dataset_options"] == list(COLOURS)
    assert main(["run", "--resume", "--out", str(out), "--n", "9", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_queries"] == 9 and summary["dataset"]["size"] == 9


def test_a_text_label_column_says_its_questions_are_open_and_offers_its_values_as_options(tmp_path: Path) -> None:
    # `hf:photos.parquet` with a string `label`: open questions without a word (answers "car wheel")
    names = [c for c in COLOURS for _ in range(2)]
    ds = colours()
    ds = ds.remove_columns("label").add_column("label", names)  # the same labels, as plain text
    ds.to_parquet(str(tmp_path / "photos.parquet"))
    source = f"hf:{tmp_path / 'photos.parquet'}"
    open_ = load_dataset(source)
    assert open_.options is None
    (warning,) = open_.warnings
    assert "the label column 'label' holds text, not classes: the questions are open" in warning
    assert "3 distinct values ('blue', 'green', 'red')" in warning
    assert f"--dataset '{source}?options=labels'" in warning
    closed = load_dataset(f"{source}?options=labels")
    assert closed.options == ("blue", "green", "red") and closed.warnings == []
    assert closed.item(2).options == ("blue", "green", "red") and closed.item(2).label == "green"
