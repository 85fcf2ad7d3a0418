"""A folder of class folders as a dataset: each sub-folder's name is the label of the images in it."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from icdistill.data.dataset import (
    DEFAULT_PROMPT,
    IMAGE_EXTENSIONS,
    FileDataset,
    Record,
    is_image_file,
    plural,
)
from icdistill.errors import DataError, MissingDataset


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _class_files(class_dir: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) anywhere under ``class_dir``, skipping hidden files and folders,
    each in sorted order."""
    images: list[Path] = []
    others: list[Path] = []
    for root, dirs, files in os.walk(class_dir):
        dirs[:] = [d for d in dirs if not _hidden(d)]  # prune in place so os.walk skips them
        for f in files:
            if not _hidden(f):
                (images if is_image_file(Path(f)) else others).append(Path(root) / f)
    return sorted(images), sorted(others)


def _not_read_warning(root: Path, others: list[Path]) -> str:
    """Name what a class folder holds that is left out: how many files, by extension, the first."""
    kinds = Counter(p.suffix.lower() or "(no extension)" for p in others)
    by_kind = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
    readable = ", ".join(sorted(IMAGE_EXTENSIONS))
    return (
        f"{root}: {plural(len(others), 'file')} in class folders left out, not an image type icd reads "
        f"({by_kind}; first: {others[0].relative_to(root).as_posix()}); read: {readable}"
    )


def load_folder(root: str | os.PathLike[str], prompt: str | None = None) -> FileDataset:
    """Build a classification dataset from ``root/<label>/**/<image>``.

    Options are the labels of the class folders that hold at least one image, sorted; files directly
    in ``root``, non-image files and hidden entries are ignored. Ids are paths relative to ``root``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingDataset(f"dataset folder {root} does not exist")
    question = prompt or DEFAULT_PROMPT
    per_class: dict[str, list[Path]] = {}
    left_out: list[Path] = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not _hidden(entry.name):
            images, others = _class_files(entry)
            left_out.extend(others)
            if images:
                per_class[entry.name] = images
    if not per_class:
        raise DataError(
            f"dataset folder {root} has no images in class sub-folders (expected {root}/<label>/*.png)"
        )
    options = tuple(sorted(per_class))
    records = [
        Record(id=path.relative_to(root).as_posix(), path=path, prompt=question, label=label, options=options)
        for label in options
        for path in per_class[label]
    ]
    dataset = FileDataset(root.name or str(root), records, options)
    if left_out:
        dataset.warnings.append(_not_read_warning(root, left_out))
    return dataset
