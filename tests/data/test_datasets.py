"""Tests for dataset loading (Fashion-MNIST, class folders, manifests) and reproducible streams."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icdistill.data.dataset import Dataset, FileDataset
from icdistill.data.fashion_mnist import DEFAULT_DIR, DIR_ENV, LABELS
from icdistill.data.stream import load_dataset, stream, stream_order
from icdistill.errors import DataError

needs_fmnist = pytest.mark.skipif(
    not (DEFAULT_DIR / "t10k-labels-idx1-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed"
)


@pytest.fixture(scope="module")
def fmnist() -> Dataset:
    return load_dataset("fashion-mnist")


# --- Fashion-MNIST ---------------------------------------------------------------------------


@needs_fmnist
def test_fashion_mnist_test_split(fmnist: Dataset) -> None:
    assert len(fmnist) == 10_000
    assert fmnist.options == LABELS
    q = fmnist.item(0)
    assert q.image is not None and q.image.size == (28, 28) and q.image.mode == "L"
    assert q.id == q.image_ref == "fashion-mnist:test:0"
    assert q.prompt == "What type of clothing item is shown in this image?"
    # Compare with the raw IDX bytes: labels start after an 8-byte header, pixels after 16.
    raw_labels = gzip.decompress((DEFAULT_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    raw_images = gzip.decompress((DEFAULT_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert q.label == LABELS[raw_labels[8]] == "Ankle boot"
    assert np.asarray(q.image).tobytes() == raw_images[16 : 16 + 784]
    labels = fmnist.labels()
    assert len(labels) == 10_000 and set(labels) == set(LABELS)
    assert labels[123] == fmnist.item(123).label


@needs_fmnist
def test_fashion_mnist_prompt_and_cached_copy(fmnist: Dataset) -> None:
    ds = load_dataset("Fashion-MNIST", prompt="Which garment?")
    assert ds.item(5).prompt == "Which garment?"
    a = fmnist.item(7).image
    assert a is not None
    a.paste(255, (0, 0, 28, 28))  # mutating a returned image must not reach the cache
    b = fmnist.item(7).image
    assert b is not None and np.asarray(b).min() < 255


def test_fashion_mnist_missing_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", split="train")


def test_fashion_mnist_env_override_and_bad_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny hand-made IDX pair proves the override folder is the one read.
    n = 3
    images = np.arange(n * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(n, 28, 28)
    header = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        (0x801).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes([3, 1, 4])
    )
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    ds = load_dataset("fashion-mnist")
    assert len(ds) == 3 and ds.labels() == ["Dress", "Trouser", "Coat"]
    image = ds.item(2).image
    assert image is not None and np.array_equal(np.asarray(image), images[2])
    with pytest.raises(DataError, match="split"):
        load_dataset("fashion-mnist", split="validation")


# --- streams ---------------------------------------------------------------------------------


@needs_fmnist
def test_stream_reproducible(fmnist: Dataset) -> None:
    a = [q.id for q in stream(fmnist, n=50, seed=1)]
    assert a == [q.id for q in stream(fmnist, n=50, seed=1)]
    assert a != [q.id for q in stream(fmnist, n=50, seed=2)]
    assert len(set(a)) == 50
    # A longer stream with the same seed starts with the shorter one.
    assert [q.id for q in stream(fmnist, n=80, seed=1)][:50] == a
    assert [q.position for q in stream(fmnist, n=5, seed=1)] == [0, 1, 2, 3, 4]
    assert [q.id for q in stream(fmnist, n=3, shuffle=False)] == [f"fashion-mnist:test:{i}" for i in range(3)]


@needs_fmnist
def test_stream_resume(fmnist: Dataset) -> None:
    full = [(q.position, q.id) for q in stream(fmnist, n=20, seed=7)]
    resumed = [(q.position, q.id) for q in stream(fmnist, n=20, seed=7, start=12)]
    assert resumed == full[12:]
    assert list(stream(fmnist, n=20, seed=7, start=20)) == []


def test_stream_order() -> None:
    assert stream_order(5, None, shuffle=False) == [0, 1, 2, 3, 4]
    order = stream_order(100, 10, seed=3)
    assert order == stream_order(100, 10, seed=3) and len(set(order)) == 10
    assert order == np.random.default_rng(3).permutation(100)[:10].tolist()
    assert sorted(stream_order(7, 1000, seed=0)) == list(range(7))  # n > len -> len
    with pytest.raises(DataError, match="empty stream"):
        stream_order(10, 0)
    with pytest.raises(DataError, match="empty stream"):
        stream_order(0, None)


# --- class folders ---------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "animals"
    for name in ("zebra", "cat", "dog"):
        (root / name).mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "cat" / "a.png")
    Image.new("RGB", (64, 48), (10, 200, 10)).save(root / "cat" / "b.JPG", format="JPEG")
    Image.new("L", (16, 16), 77).save(root / "dog" / "grey.png")
    Image.new("RGBA", (8, 8), (0, 0, 255, 0)).save(root / "dog" / "clear.png")  # fully transparent
    Image.new("RGB", (3000, 2000), (1, 2, 3)).save(root / "zebra" / "big.jpeg", format="JPEG")
    (root / "zebra" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (root / "zebra" / "notes.txt").write_text("not an image")
    (root / "zebra" / ".hidden.png").write_bytes(b"")
    (root / ".cache").mkdir()
    Image.new("RGB", (4, 4)).save(root / ".cache" / "x.png")
    Image.new("RGB", (4, 4)).save(root / "loose.png")  # files in the root are not a class
    (root / "empty_class").mkdir()
    return root


def test_folder_dataset(folder: Path) -> None:
    ds = load_dataset(str(folder))
    assert ds.name == "animals"
    assert ds.options == ("cat", "dog", "zebra")
    assert isinstance(ds, FileDataset)
    by_id = {r.id: i for i, r in enumerate(ds.records)}
    expected = [
        "cat/a.png",
        "cat/b.JPG",
        "dog/clear.png",
        "dog/grey.png",
        "zebra/big.jpeg",
        "zebra/broken.png",
    ]
    assert sorted(by_id) == expected  # hidden, root-level and non-image files are skipped
    q = ds.item(by_id["cat/b.JPG"])
    assert q.label == "cat" and q.options == ds.options and q.image is not None
    assert q.image.mode == "RGB" and q.image.size == (64, 48)
    assert q.prompt == "What is shown in this image?"
    assert Path(q.image_ref) == folder / "cat" / "b.JPG"
    grey = ds.item(by_id["dog/grey.png"]).image
    assert grey is not None and grey.mode == "L"
    clear = ds.item(by_id["dog/clear.png"]).image
    assert clear is not None and clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)
    big = ds.item(by_id["zebra/big.jpeg"]).image
    assert big is not None and big.size == (3000, 2000)
    assert ds.labels()[by_id["zebra/big.jpeg"]] == "zebra"
    with pytest.raises(DataError, match="broken.png"):
        ds.item(by_id["zebra/broken.png"])


def test_folder_image_formats(tmp_path: Path) -> None:
    root = tmp_path / "formats"
    (root / "c").mkdir(parents=True)
    rgb = Image.new("RGB", (12, 9), (30, 60, 90))
    for ext in ("bmp", "gif", "webp", "tif"):
        rgb.save(root / "c" / f"x.{ext}")
    palette = Image.new("P", (5, 5), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(root / "c" / "pal.png", transparency=0)
    Image.new("I;16", (6, 6), 65535).save(root / "c" / "deep.png")
    Image.new("CMYK", (6, 6), (0, 0, 0, 0)).save(root / "c" / "print.jpg")
    ds = load_dataset(root)
    assert len(ds) == 7
    for i in range(len(ds)):
        image = ds.item(i).image
        assert image is not None and image.mode in ("RGB", "L"), ds.item(i).id
    assert isinstance(ds, FileDataset)
    modes = {r.id: ds.item(i).image.mode for i, r in enumerate(ds.records)}  # type: ignore[union-attr]
    assert modes["c/deep.png"] == "L" and modes["c/pal.png"] == "RGB"


def test_stream_skips_corrupt_with_on_error(folder: Path) -> None:
    ds = load_dataset(folder, prompt="Which animal?")
    errors: list[tuple[int, str]] = []
    got = list(stream(ds, seed=0, on_error=lambda pos, e: errors.append((pos, str(e)))))
    assert len(got) == 5 and len(errors) == 1 and "broken.png" in errors[0][1]
    assert all(q.prompt == "Which animal?" for q in got)
    assert sorted([q.position for q in got] + [errors[0][0]]) == list(range(6))
    # Without on_error the DataError reaches the caller, and the stream carries on afterwards.
    it = stream(ds, seed=0)
    seen, failed = 0, 0
    while True:
        try:
            next(it)
            seen += 1
        except DataError:
            failed += 1
        except StopIteration:
            break
    assert (seen, failed) == (5, 1)


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="no dataset"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        load_dataset(tmp_path / "data.csv")


# --- manifests -------------------------------------------------------------------------------


def _write_manifest(path: Path, lines: list[object | str]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_manifest(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (10, 10), "red").save(tmp_path / "img" / "r.png")
    Image.new("L", (10, 10), 0).save(tmp_path / "b.png")
    opts = ["red", "black"]
    m = _write_manifest(
        tmp_path / "set.jsonl",
        [
            {"image": "img/r.png", "prompt": "Colour?", "label": "red", "options": opts},
            "",
            {"image": str(tmp_path / "b.png"), "label": "black", "options": opts, "source": "x"},
            {"image": "img/r.png", "options": opts},
        ],
    )
    ds = load_dataset(str(m), prompt="Default?")
    assert ds.name == "set" and len(ds) == 3 and ds.options == ("red", "black")
    q0, q1, q2 = (ds.item(i) for i in range(3))
    assert (q0.id, q0.prompt, q0.label) == ("img/r.png", "Colour?", "red")
    assert q0.image is not None and q0.image.getpixel((0, 0)) == (255, 0, 0)
    assert q1.prompt == "Default?" and q1.meta["source"] == "x" and q1.image is not None
    assert q2.id == "img/r.png#4" and q2.label is None
    assert ds.labels() == ["red", "black", ""]

    open_ended = _write_manifest(tmp_path / "open.jsonl", [{"image": "b.png"}])
    ds = load_dataset(open_ended)
    assert ds.options is None and ds.item(0).options is None
    assert ds.item(0).prompt == "What is shown in this image?"


def test_manifest_errors(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    good = {"image": "a.png", "label": "x", "options": ["x", "y"]}
    bad_label = _write_manifest(tmp_path / "l.jsonl", [good, {**good, "label": "z"}])
    with pytest.raises(DataError, match=r"l\.jsonl:2.*'z' is not among"):
        load_dataset(bad_label)
    bad_json = _write_manifest(tmp_path / "j.jsonl", [good, good, '{"image": "a.png",'])
    with pytest.raises(DataError, match=r"j\.jsonl:3: invalid JSON"):
        load_dataset(bad_json)
    missing = _write_manifest(tmp_path / "m.jsonl", [good, {"image": "nope.png"}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: image file .*nope\.png not found"):
        load_dataset(missing)
    no_image = _write_manifest(tmp_path / "n.jsonl", [{"label": "x"}])
    with pytest.raises(DataError, match=r'n\.jsonl:1: missing "image"'):
        load_dataset(no_image)
    empty = _write_manifest(tmp_path / "e.jsonl", [""])
    with pytest.raises(DataError, match="no items"):
        load_dataset(empty)


def test_manifest_refuses_a_one_option_question(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4), "red").save(tmp_path / "r.png")
    m = _write_manifest(tmp_path / "one.jsonl", [{"image": "r.png", "label": "red", "options": ["red"]}])
    with pytest.raises(DataError, match="at least two options"):
        load_dataset(str(m))


def test_fingerprint_changes_with_the_data(tmp_path: Path) -> None:
    root = tmp_path / "set"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        Image.new("RGB", (4, 4), "red").save(root / label / "0.png")
    fp = load_dataset(str(root)).fingerprint()
    assert load_dataset(str(root)).fingerprint() == fp  # stable
    Image.new("RGB", (4, 4), "blue").save(root / "b" / "1.png")  # an image added
    fp2 = load_dataset(str(root)).fingerprint()
    assert fp2 != fp
    Image.new("RGB", (40, 40), "blue").save(root / "b" / "1.png")  # an image replaced by another
    assert load_dataset(str(root)).fingerprint() != fp2


def test_manifest_names_unknown_keys_with_their_line(tmp_path: Path) -> None:
    Image.new("RGB", (10, 10), "red").save(tmp_path / "r.png")
    m = _write_manifest(
        tmp_path / "typos.jsonl",
        [
            {"image": "r.png", "label": "red", "option": ["red", "blue"]},  # "option" for "options"
            {"image": "r.png", "lable": "red"},
            {"image": "r.png", "lable": "blue", "source": "camera 2"},
        ],
    )
    ds = load_dataset(m)
    assert ds.options is None  # the typo still makes open questions: the warnings say why
    assert len(ds.warnings) == 3, ds.warnings
    option, lable, source = ds.warnings
    assert option.startswith(f"{m}:1: ") and 'unknown key "option" (did you mean "options"?)' in option
    assert lable.startswith(f"{m}:2 and 1 more line(s): ") and '"lable" (did you mean "label"?)' in lable
    assert f"{m}:3: " in source and "did you mean" not in source
    assert ds.where(1) == f"{m}:2"
    ok = _write_manifest(tmp_path / "ok.jsonl", [{"image": "r.png", "label": "red", "id": "a"}])
    assert load_dataset(ok).warnings == []


def test_folder_counts_files_it_cannot_read(tmp_path: Path) -> None:
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        Image.new("RGB", (8, 8), "red").save(tmp_path / label / "a.png")
    (tmp_path / "cat" / "b.svg").write_text("<svg/>")
    (tmp_path / "dog" / "c.svg").write_text("<svg/>")
    (tmp_path / "dog" / "notes.txt").write_text("x")
    (tmp_path / "dog" / ".hidden.svg").write_text("x")  # hidden files stay out of the count
    ds = load_dataset(tmp_path)
    assert len(ds) == 2 and len(ds.warnings) == 1
    w = ds.warnings[0]
    assert "3 files in class folders left out" in w and ".svg 2, .txt 1" in w and "first: cat/b.svg" in w


def test_a_strip_of_an_image_is_skipped_from_its_header_not_decoded(tmp_path: Path) -> None:
    """A 1 x 20,000 PNG (a few hundred bytes) would cost gigabytes once scaled for the tagger: the
    loader refuses it from the header, so a run logs it as a bad input and carries on."""
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / label / "ok.png")
    Image.new("L", (1, 20_000)).save(tmp_path / "a" / "strip.png")
    ds = load_dataset(tmp_path)
    errors: list[tuple[int, str]] = []
    got = list(stream(ds, seed=0, on_error=lambda pos, e: errors.append((pos, str(e)))))
    assert len(got) == 2 and len(errors) == 1
    assert "strip.png" in errors[0][1] and "1x20000" in errors[0][1]
