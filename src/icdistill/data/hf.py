"""A Hugging Face ``datasets`` dataset as a stream: ``hf:<path or cached name>[?key=value&...]``.

The target is a folder saved with ``save_to_disk``, a folder of parquet/arrow (or WebDataset) files,
one such file, or the name of a dataset in the local Hugging Face cache. With
``HF_DATASETS_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) nothing is downloaded: a name that is not cached
fails. Keys (all optional): ``image=`` the image column (default: the one ``Image`` column),
``label=`` the label column (default: the one ``ClassLabel`` column, else ``label``/``labels``),
``prompt=`` a column of questions or the question itself, ``options=`` a column of per-row option
lists, or ``options=labels``: the label column's distinct values, for every row (default: the
``ClassLabel`` names; none: open questions, said in a warning when the labels are text), ``split=``
the split (default: the run's ``--split`` when the dataset has it, else its only split).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from icdistill.data.dataset import DEFAULT_PROMPT, Dataset, normalise_mode
from icdistill.errors import DataError, MissingDataset
from icdistill.types import Query

PREFIX = "hf:"
KEYS = ("image", "label", "prompt", "options", "split")
LABELS = "labels"  # options=labels: the label column's distinct values (unless a column is so named)
MAX_SUGGESTED_OPTIONS = 50  # more distinct text labels than this look like captions, not classes
_LOCAL_FILE_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}


def is_hf_source(source: str) -> bool:
    return source.strip().lower().startswith(PREFIX)


def _split_source(source: str) -> tuple[str, str]:
    """(target, query string) of ``hf:<target>[?<query>]``; the first ``?`` starts the keys."""
    target, _, query = source.strip()[len(PREFIX) :].partition("?")
    return target.strip(), query


def absolute_hf_source(source: str) -> str:
    """The source with a local target made absolute (a resume from another folder finds it); a
    cached dataset's name stays as it is."""
    target, query = _split_source(source)
    path = Path(target).expanduser()
    if not path.exists():
        return source
    return f"{PREFIX}{path.resolve()}" + (f"?{query}" if query else "")


def _parse(source: str) -> tuple[str, dict[str, str]]:
    from icdistill.models.registry import parse_options

    target, query = _split_source(source)
    if not target:
        raise DataError(
            f"--dataset {source!r}: expected hf:<folder, file or cached name>[?image=...&label=...]"
        )
    keys = parse_options(query, source) if query else {}
    unknown = sorted(set(keys) - set(KEYS))
    if unknown:
        raise DataError(
            f"--dataset {source!r}: unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}"
        )
    return target, keys


def _open(target: str, source: str) -> Any:
    """The ``datasets`` object (a Dataset or a DatasetDict) the target names; DataError otherwise."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"--dataset {source!r} needs the datasets package: pip install 'icdistill[hf-datasets]'"
        ) from e
    datasets.disable_progress_bars()  # they would print through icd's own progress display
    datasets.logging.set_verbosity_error()  # "Using the latest cached version...": the run says what it reads
    path = Path(target).expanduser()
    looks_local = target.startswith((".", "/", "~")) or path.suffix.lower() in _LOCAL_FILE_FORMATS
    if not path.exists() and looks_local:
        raise MissingDataset(f"no dataset {source!r}: {path} does not exist")
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            return datasets.load_from_disk(str(path))
        if path.is_file():
            fmt = _LOCAL_FILE_FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise DataError(f"--dataset {source!r}: expected a .parquet or .arrow file, or a folder")
            return datasets.load_dataset(fmt, data_files=str(path))
        return datasets.load_dataset(str(path) if path.exists() else target)
    except DataError:
        raise
    # Broad on purpose: datasets raises assorted types (FileNotFoundError, ConnectionError,
    # DatasetNotFoundError, ValueError...) for a missing, uncached or malformed dataset.
    except Exception as e:
        text = " ".join(str(e).split())[:300]
        hint = (
            "; it is not in the local cache and downloads are off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)"
            if "offline" in text.lower()
            else ""
        )
        raise DataError(f"cannot load --dataset {source!r}: {type(e).__name__}: {text}{hint}") from e


def _pick_split(obj: Any, wanted: str | None, default: str, source: str) -> tuple[Any, str]:
    if not hasattr(obj, "keys"):  # a single Dataset
        return obj, wanted or str(obj.split or "train")
    names = list(obj.keys())
    split = wanted or (default if default in names else names[0] if len(names) == 1 else None)
    if split is None:
        raise DataError(f"--dataset {source!r} has splits {', '.join(names)}: choose one with split=")
    if split not in names:
        raise DataError(f"--dataset {source!r} has no split {split!r}; its splits: {', '.join(names)}")
    return obj[split], split


def _column(ds: Any, key: str, given: str | None, source: str) -> str | None:
    if given is not None and given not in ds.features:
        raise DataError(
            f"--dataset {source!r}: no column {given!r} for {key}=; columns: {', '.join(ds.features)}"
        )
    return given


def _default_image_column(ds: Any, source: str) -> str:
    from datasets import Image as ImageFeature

    found = [name for name, f in ds.features.items() if isinstance(f, ImageFeature)]
    if len(found) != 1:
        what = f"{len(found)} image columns ({', '.join(found)})" if found else "no image column"
        raise DataError(
            f"--dataset {source!r} has {what}: name one with image=; columns: {', '.join(ds.features)}"
        )
    return found[0]


def _default_label_column(ds: Any) -> str | None:
    from datasets import ClassLabel

    class_labels = [name for name, f in ds.features.items() if isinstance(f, ClassLabel)]
    if len(class_labels) == 1:
        return class_labels[0]
    return next((name for name in ("label", "labels") if name in ds.features), None)


def _labels(ds: Any, column: str | None, source: str) -> tuple[list[str | None], tuple[str, ...] | None]:
    """Each row's label as text (None: unlabelled) and the ClassLabel names, if the column has them."""
    from datasets import ClassLabel

    if column is None:
        return [None] * len(ds), None
    feature = ds.features[column]
    values = ds[column]
    if isinstance(feature, ClassLabel):
        # -1 marks an unlabelled row (e.g. a hidden test split)
        return [feature.int2str(v) if v is not None and v >= 0 else None for v in values], tuple(
            feature.names
        )
    out: list[str | None] = []
    for v in values:
        if v is None or isinstance(v, str | int) and not isinstance(v, bool):
            out.append(None if v is None or v == "" else str(v))
        else:
            raise DataError(
                f"--dataset {source!r}: label column {column!r} holds {type(v).__name__}, not text or a class"
            )
    return out, None


class HFDataset(Dataset):
    """Rows of a ``datasets.Dataset``: images decoded on demand, labels and questions read up front."""

    def __init__(
        self,
        name: str,
        ds: Any,
        split: str,
        image_column: str,
        labels: list[str | None],
        prompts: list[str],
        options: list[tuple[str, ...] | None],
    ) -> None:
        distinct = set(options)
        super().__init__(name, distinct.pop() if len(distinct) == 1 else None)
        self._images = ds.select_columns([image_column])
        self._image_column = image_column
        self.split = split
        self._labels = labels
        self._prompts = prompts
        self._options = options

    def __len__(self) -> int:
        return len(self._labels)

    def _query(self, i: int) -> Query:
        return Query(
            id=f"{self.split}/{i}",
            image=None,
            prompt=self._prompts[i],
            options=self._options[i],
            label=self._labels[i],
            meta={"dataset": self.name, "index": i},
        )

    def where(self, i: int) -> str:
        return f"{self.name} {self.split}[{i}]"

    def _decode(self, i: int) -> Image.Image:
        try:
            image = self._images[i][self._image_column]
            if image is None:
                raise DataError(f"{self.where(i)}: no image")
            if not isinstance(image, Image.Image):
                raise DataError(
                    f"{self.where(i)}: column {self._image_column!r} holds {type(image).__name__}"
                )
            return normalise_mode(ImageOps.exif_transpose(image))
        except DataError:
            raise
        except Exception as e:  # decoders raise assorted types on bad bytes
            raise DataError(f"cannot read image {self.where(i)}: {type(e).__name__}: {e}") from e

    def fingerprint(self) -> str:
        """Labels, questions, options and each image's size in bytes (read from the arrow column,
        nothing decoded): a resumed run refuses data that changed."""
        h = hashlib.sha1(
            json.dumps([self._labels, self._prompts, [list(o or ()) for o in self._options]]).encode()
        )
        h.update(",".join(map(str, self._image_sizes())).encode())
        return h.hexdigest()[:20]

    def _image_sizes(self) -> list[int]:
        import pyarrow.compute as pc
        from datasets import Image as ImageFeature

        raw = self._images.cast_column(self._image_column, ImageFeature(decode=False)).with_format("arrow")
        column = raw[:][self._image_column]
        sizes = pc.binary_length(pc.struct_field(column, "bytes"))
        return [-1 if s is None else s for s in sizes.to_pylist()]

    def labels(self) -> list[str]:
        return [label or "" for label in self._labels]


def load_hf(source: str, *, split: str = "test", prompt: str | None = None) -> HFDataset:
    """Open ``hf:<target>[?image=..&label=..&prompt=..&options=..&split=..]`` (see the module doc);
    ``split`` is the run's ``--split``, used when the source names none and the dataset has it."""
    target, keys = _parse(source)
    ds, split = _pick_split(_open(target, source), keys.get("split"), split, source)
    image_column = _column(ds, "image", keys.get("image"), source) or _default_image_column(ds, source)
    label_column = _column(ds, "label", keys.get("label"), source) or _default_label_column(ds)
    labels, class_names = _labels(ds, label_column, source)
    question = keys.get("prompt")
    if question is not None and question in ds.features:
        prompts = [str(p) if p else prompt or DEFAULT_PROMPT for p in ds[question]]
    else:
        prompts = [question or prompt or DEFAULT_PROMPT] * len(ds)
    warnings = []
    distinct = tuple(sorted({label for label in labels if label is not None}))
    if keys.get("options") == LABELS and (LABELS not in ds.features or label_column == LABELS):
        if not distinct:
            raise DataError(f"--dataset {source!r}: options=labels but no row has a label")
        options: list[tuple[str, ...] | None] = [distinct] * len(ds)
    elif (options_column := _column(ds, "options", keys.get("options"), source)) is not None:
        options = [tuple(map(str, o)) if o else None for o in ds[options_column]]
    else:
        options = [class_names] * len(ds)
        if class_names is None and distinct:
            warnings.append(_open_warning(source, label_column, distinct))
    for i, (label, opts) in enumerate(zip(labels, options, strict=True)):
        if label is not None and opts is not None and label not in opts:
            raise DataError(
                f"--dataset {source!r}: row {i}: label {label!r} is not among its options {list(opts)}"
            )
    if not labels:
        raise DataError(f"--dataset {source!r}: split {split!r} has no rows")
    name = Path(target).name or target
    dataset = HFDataset(name, ds, split, image_column, labels, prompts, options)
    dataset.warnings.extend(warnings)
    return dataset


def _open_warning(source: str, column: str | None, distinct: tuple[str, ...]) -> str:
    """What a text label column makes of the questions, and how to ask them as a choice instead."""
    shown = ", ".join(repr(d) for d in distinct[:5]) + (", ..." if len(distinct) > 5 else "")
    said = (
        f"the label column {column!r} holds text, not classes: the questions are open (the student "
        f"writes an answer, scored by normalised exact match against the label). It has "
        f"{len(distinct)} distinct values ({shown})"
    )
    if len(distinct) > MAX_SUGGESTED_OPTIONS:
        return said
    with_options = f"{source}{'&' if '?' in source else '?'}options={LABELS}"
    return f"{said}; to ask them as a choice among these, use --dataset '{with_options}'"
