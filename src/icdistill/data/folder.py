"""A folder of class folders as a dataset: each sub-folder's name is the label of the images in it."""

from __future__ import annotations

import os
from pathlib import Path

from icdistill.data.stream import DEFAULT_PROMPT, FileDataset, Record, is_image_file
from icdistill.types import DataError


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _class_images(class_dir: Path) -> list[Path]:
    """Image files anywhere under ``class_dir``, skipping hidden files and folders, in sorted order."""
    found: list[Path] = []
    for root, dirs, files in os.walk(class_dir):
        dirs[:] = [d for d in dirs if not _hidden(d)]  # prune in place so os.walk skips them
        found.extend(Path(root) / f for f in files if not _hidden(f) and is_image_file(Path(f)))
    return sorted(found)


def load_folder(root: str | os.PathLike[str], prompt: str | None = None) -> FileDataset:
    """Build a classification dataset from ``root/<label>/**/<image>``.

    Options are the labels of the class folders that hold at least one image, sorted; files directly
    in ``root``, non-image files and hidden entries are ignored. Ids are paths relative to ``root``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    question = prompt or DEFAULT_PROMPT
    per_class: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not _hidden(entry.name):
            images = _class_images(entry)
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
    return FileDataset(root.name or str(root), records, options)
