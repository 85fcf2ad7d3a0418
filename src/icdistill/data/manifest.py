"""A ``.jsonl`` manifest as a dataset: one ``{"image", "prompt", "label", "options"}`` object per line."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from icdistill.data.dataset import DEFAULT_PROMPT, FileDataset, Record
from icdistill.errors import DataError, MissingDataset

_KNOWN_KEYS = frozenset({"image", "prompt", "label", "options", "id"})


def _text(value: Any, what: str, where: str) -> str:
    # Numeric labels (e.g. digit classes) are common in hand-written manifests; take them as text.
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")


def _parse_line(obj: Any, where: str, base: Path, default_prompt: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "image" not in obj:
        raise DataError(f'{where}: missing "image"')
    image = _text(obj["image"], '"image"', where)
    path = Path(image).expanduser()
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise DataError(f"{where}: image file {path} not found")
    prompt = _text(obj["prompt"], '"prompt"', where) if obj.get("prompt") is not None else default_prompt
    label = _text(obj["label"], '"label"', where) if obj.get("label") is not None else None
    options: tuple[str, ...] | None = None
    if obj.get("options") is not None:
        raw = obj["options"]
        if not isinstance(raw, list) or not raw:
            raise DataError(f'{where}: "options" must be a non-empty list of strings')
        if len(raw) < 2:
            raise DataError(f'{where}: "options" has one entry {raw}: a question needs at least two options')
        options = tuple(_text(o, "each option", where) for o in raw)
        if len(set(options)) != len(options):
            raise DataError(f'{where}: "options" has duplicates: {list(options)}')
        if label is not None and label not in options:
            raise DataError(f"{where}: label {label!r} is not among the options {list(options)}")
    item_id = _text(obj["id"], '"id"', where) if obj.get("id") is not None else image
    meta = {k: v for k, v in obj.items() if k not in _KNOWN_KEYS}
    return Record(
        id=item_id, path=path, prompt=prompt, label=label, options=options, meta=meta, where=where
    )


def _unknown_key_warnings(first_seen: dict[str, str], counts: Counter[str]) -> list[str]:
    """One warning per unknown key: where it first appears, how often, and the key it may mistype."""
    out = []
    for key, where in first_seen.items():
        close = difflib.get_close_matches(key.lower(), sorted(_KNOWN_KEYS), n=1, cutoff=0.6)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        times = f" and {counts[key] - 1} more line(s)" if counts[key] > 1 else ""
        out.append(
            f'{where}{times}: unknown key "{key}"{hint}; it is not read, only kept in the log '
            f"(known keys: {', '.join(sorted(_KNOWN_KEYS))})"
        )
    return out


def load_manifest(path: str | os.PathLike[str], prompt: str | None = None) -> FileDataset:
    """Read a manifest; image paths are relative to the manifest's folder unless absolute.

    Every line is checked up front (JSON, fields, image file present) so errors name their line
    before the run starts. Ids are ``"id"`` when given, else the image path as written (made unique
    with ``#<line>`` when an image appears twice). Dataset options are the shared options of all
    lines, or None when they differ or are absent.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingDataset(f"manifest {path} not found")
    base = path.resolve().parent
    default_prompt = prompt or DEFAULT_PROMPT
    records: list[Record] = []
    seen: set[str] = set()
    first_seen: dict[str, str] = {}  # unknown key -> file:line of its first use
    unknown: Counter[str] = Counter()
    try:
        # utf-8-sig: manifests saved by Windows editors start with a BOM.
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read manifest {path}: {e}") from e
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from e
        record = _parse_line(obj, where, base, default_prompt)
        for key in record.meta:
            first_seen.setdefault(key, where)
            unknown[key] += 1
        if record.id in seen:
            if obj.get("id") is not None:
                raise DataError(f"{where}: duplicate id {record.id!r}")
            record = dataclasses.replace(record, id=f"{record.id}#{lineno}")
        seen.add(record.id)
        records.append(record)
    if not records:
        raise DataError(f"manifest {path} has no items")
    distinct = {r.options for r in records}
    options = distinct.pop() if len(distinct) == 1 else None
    dataset = FileDataset(path.stem, records, options)
    dataset.warnings.extend(_unknown_key_warnings(first_seen, unknown))
    return dataset
