"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files, decoded whole into arrays)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

from icdistill.data.dataset import Dataset
from icdistill.errors import DataError
from icdistill.types import Query

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
DIR_ENV = "ICDISTILL_FASHION_MNIST_DIR"
LABELS: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEFAULT_PROMPT = "What type of clothing item is shown in this image?"
_FILE_PREFIX = {"test": "t10k", "train": "train"}
_SPLIT_ALIASES = {"test": "test", "t10k": "test", "train": "train"}
_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR).expanduser()


def _idx_path(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):  # the package ships .gz; accept unpacked copies too
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"Fashion-MNIST file {stem}.gz not found in {folder}: install it with "
        f"`apt-get install dataset-fashion-mnist`, or point {DIR_ENV} at a folder holding the IDX files"
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an unsigned-byte IDX array (gzipped or not), checking its header against the data."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind")
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    if len(data) - header != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} but the file holds {len(data) - header} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST as 28x28 grayscale (L) queries over the ten class names."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, split: str, prompt: str | None = None) -> None:
        super().__init__(f"fashion-mnist:{split}", LABELS)
        if len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
        if labels.size and int(labels.max()) >= len(LABELS):
            raise DataError(f"Fashion-MNIST {split}: label {int(labels.max())} outside 0..9")
        self.split = split
        self.prompt = prompt or DEFAULT_PROMPT
        self.images = images
        self.label_ids = labels

    def __len__(self) -> int:
        return len(self.label_ids)

    def _query(self, i: int) -> Query:
        ref = f"{self.name}:{i}"
        return Query(
            id=ref,
            image=None,
            prompt=self.prompt,
            options=LABELS,
            label=LABELS[self.label_ids[i]],
            image_ref=ref,
            meta={"dataset": self.name, "index": i},
        )

    def _decode(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])  # 2-D uint8 -> mode L

    def labels(self) -> list[str]:
        return [LABELS[k] for k in self.label_ids.tolist()]


def load_fashion_mnist(split: str = "test", prompt: str | None = None) -> FashionMNIST:
    """Load a split (``test``: 10k, ``train``: 60k) from ``$ICDISTILL_FASHION_MNIST_DIR`` or the Debian path."""
    key = _SPLIT_ALIASES.get(split.strip().lower())
    if key is None:
        raise DataError(f"unknown Fashion-MNIST split {split!r}: use 'test' or 'train'")
    folder = fashion_mnist_dir()
    if not folder.is_dir():
        raise DataError(
            f"Fashion-MNIST not found at {folder}: install it with `apt-get install dataset-fashion-mnist`"
            f" (or set {DIR_ENV} to a folder holding the IDX files)"
        )
    prefix = _FILE_PREFIX[key]
    images = read_idx(_idx_path(folder, f"{prefix}-images-idx3-ubyte"), _IMAGES_MAGIC)
    labels = read_idx(_idx_path(folder, f"{prefix}-labels-idx1-ubyte"), _LABELS_MAGIC)
    return FashionMNIST(images, labels, key, prompt)
