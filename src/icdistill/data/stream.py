"""Datasets of image queries and the reproducible streams drawn from them.

``load_dataset`` resolves a source (``fashion-mnist``, a class-per-folder directory, a ``.jsonl``
manifest); ``stream`` yields its items as ``Query`` objects in a seeded order.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from icdistill.data.dataset import (
    FASHION_MNIST_NAMES,
    Dataset,
    plural,
)
from icdistill.data.fashion_mnist import load_fashion_mnist
from icdistill.data.folder import load_folder
from icdistill.data.hf import absolute_hf_source, is_hf_source, load_hf
from icdistill.data.manifest import load_manifest
from icdistill.errors import DataError, MissingDataset
from icdistill.types import Query


def load_dataset(
    source: str | os.PathLike[str], *, split: str = "test", prompt: str | None = None
) -> Dataset:
    """Open a dataset: ``fashion-mnist`` (``split`` test or train), a folder of class folders, a
    ``.jsonl`` manifest, or ``hf:<path or cached name>?key=value`` (``icdistill.data.hf``; ``split``
    when it names none). ``prompt`` replaces the default question (a manifest line's own prompt wins).

    The name ``fashion-mnist`` always means the packaged dataset; write ``./fashion-mnist`` for a
    folder of that name.
    """
    text = os.fspath(source)
    if text.strip().lower() in FASHION_MNIST_NAMES:
        return load_fashion_mnist(split=split, prompt=prompt)
    if is_hf_source(text):
        return load_hf(text, split=split, prompt=prompt)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".jsonl":
        return load_manifest(path, prompt=prompt)
    if path.is_dir():
        return load_folder(path, prompt=prompt)
    if path.exists():
        raise DataError(f"unsupported dataset file {text!r}: expected a .jsonl manifest or a folder")
    raise MissingDataset(
        f"no dataset {text!r}: expected 'fashion-mnist', a folder with one sub-folder per class, "
        "a .jsonl manifest, or hf:<Hugging Face dataset folder or cached name>"
    )


def absolute_source(source: str) -> str:
    """A dataset source with its local path made absolute (a resume from another folder finds it);
    the name ``fashion-mnist`` and cached Hugging Face names stay as they are."""
    if source.strip().lower() in FASHION_MNIST_NAMES:
        return source
    if is_hf_source(source):
        return absolute_hf_source(source)
    return str(Path(source).expanduser().resolve())


def stream_order(length: int, n: int | None = None, seed: int = 0, shuffle: bool = True) -> list[int]:
    """Item indices in stream order: the first ``n`` of a seeded permutation (or of 0..length-1).

    The same seed gives the same permutation whatever ``n``, so a shorter stream is a prefix of a
    longer one.
    """
    if n is not None and n < 0:
        raise DataError(f"stream length must be >= 0, got {n}")
    count = length if n is None else min(n, length)
    if count <= 0:
        raise DataError(f"empty stream: the dataset has {plural(length, 'item')}, n={n}")
    if not shuffle:
        return list(range(count))
    perm = np.random.default_rng(seed).permutation(length)
    return perm[:count].tolist()


class QueryStream(Iterator[Query]):
    """Iterator over a dataset in stream order, with ``Query.position`` set to the stream index.

    Unlike a generator it survives a raised DataError (an unreadable image): the failed position is
    consumed and the next ``next()`` continues with the following one. With ``on_error`` set such
    items are reported to it and skipped, so a plain ``for`` loop runs through.
    """

    def __init__(
        self,
        dataset: Dataset,
        order: list[int],
        start: int = 0,
        on_error: Callable[[int, DataError], None] | None = None,
    ) -> None:
        if start < 0:
            raise DataError(f"stream start must be >= 0, got {start}")
        self.dataset = dataset
        self.order = order
        self.position = start  # the next position to yield
        self.on_error = on_error

    def __len__(self) -> int:
        """Positions left to yield."""
        return max(0, len(self.order) - self.position)

    def __next__(self) -> Query:
        while self.position < len(self.order):
            pos = self.position
            self.position += 1  # advance first so a raise leaves the stream usable
            try:
                query = self.dataset.item(self.order[pos])
            except DataError as e:
                if self.on_error is None:
                    raise
                self.on_error(pos, e)
                continue
            return dataclasses.replace(query, position=pos)
        raise StopIteration


def stream(
    dataset: Dataset,
    n: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    start: int = 0,
    on_error: Callable[[int, DataError], None] | None = None,
) -> QueryStream:
    """Reproducible stream of ``dataset``'s queries; ``start`` resumes at that position (positions
    keep their values). Unreadable items raise DataError, or go to ``on_error(position, error)``."""
    return QueryStream(dataset, stream_order(len(dataset), n, seed, shuffle), start, on_error)
