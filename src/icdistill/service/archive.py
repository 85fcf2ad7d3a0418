"""Reading an import (a ``/v1/export`` zip or an ``icd run`` pool.sqlite) into checked demo records.

Everything is read and checked before anything is pooled, so an import is all-or-nothing: every line
or row goes through ``validate.demo_record`` (as ``POST /v1/demos`` does), every image through
``decode_image`` with the per-image pixel limit, and all images together through one pixel budget.
Runs off the loop thread: reading never holds up the student.
"""

from __future__ import annotations

import io
import sqlite3
import tempfile
import uuid
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from icdistill.errors import ServiceError
from icdistill.service.errors import bad_request, unprocessable
from icdistill.service.images import PixelBudget, decode_image, open_image
from icdistill.service.validate import DemoRecord, demo_record, parse_json

SQLITE_MAGIC = b"SQLite format 3\x00"
ZIP_MAGIC = b"PK\x03\x04"
# the columns of an icd run pool's pooled demos
_HAS_POOL = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'annotations'"
_POOL_ROWS = (
    "SELECT id, query_id, image_png, prompt, options, answer, teacher, votes, agreement "
    "FROM annotations WHERE in_pool = 1 ORDER BY id"
)


@dataclass(frozen=True)
class ImportLimits:
    max_pixels: int
    max_import_pixels: int
    max_unpacked_bytes: int


# one demo as read, before its image is decoded: its fields, its image's bytes, where it was
Pending = tuple[dict[str, Any], bytes | None, str]


def read_import(data: bytes, limits: ImportLimits) -> list[DemoRecord]:
    """The demos of an import, all checked; raises a 4xx naming the first bad line or row."""
    if data[:16] == SQLITE_MAGIC:
        return _checked(_from_sqlite(data), limits)
    if data[:4] == ZIP_MAGIC:
        return _checked(_from_zip(data, limits), limits)
    raise ServiceError(
        415, "bad_archive", "import takes a zip archive from /v1/export or an icd run pool.sqlite"
    )


def _checked(items: list[Pending], limits: ImportLimits) -> list[DemoRecord]:
    """Every demo's fields, then every image's header (its size, shape and the import's pixel
    budget), then the pixels: an import refused for its size decodes nothing."""
    records = [demo_record(f, None, f"import-{uuid.uuid4().hex}", "import", where) for f, _, where in items]
    budget = PixelBudget(limits.max_import_pixels)
    for _, image, where in items:
        if image:
            _at(where, open_image, image, limits.max_pixels, budget)
    decoded: dict[int, Any] = {}  # one archive file named by many lines: decoded once, by identity
    out = []
    for rec, (_, image, where) in zip(records, items, strict=True):
        if image and id(image) not in decoded:
            decoded[id(image)] = _at(where, decode_image, image, limits.max_pixels)
        out.append(replace(rec, image=decoded[id(image)]) if image else rec)
    return out


def _at(where: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, its 4xx naming the line or row."""
    try:
        return fn(*args)
    except ServiceError as e:
        raise ServiceError(e.status, e.code, f"{where}: {e.message}", e.headers) from e


def _from_zip(data: bytes, limits: ImportLimits) -> list[Pending]:
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        if sum(i.file_size for i in z.infolist()) > limits.max_unpacked_bytes:
            raise ServiceError(413, "archive_too_large", "the archive unpacks to more than the import limit")
        lines = z.read("demos.jsonl").decode().splitlines()
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, EOFError) as e:
        raise bad_request(f"not a pool archive (zip with demos.jsonl): {e}", "bad_archive") from e
    out = []
    members: dict[str, bytes] = {}  # a file named by many lines is unpacked once
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"demos.jsonl line {n}"
        rec = parse_json(line, where)
        if not isinstance(rec, dict):
            raise unprocessable(f"{where}: not a JSON object", "invalid_demo")
        out.append((rec, _zip_member(z, rec.get("image"), members, where), where))
    return out


def _zip_member(z: zipfile.ZipFile, name: Any, members: dict[str, bytes], where: str) -> bytes | None:
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise unprocessable(f"{where}: image must be a file name in the archive", "invalid_demo")
    if name not in members:
        try:
            members[name] = z.read(name)
        except (KeyError, zipfile.BadZipFile, EOFError) as e:
            raise unprocessable(f"{where}: cannot read image {name!r}: {e}", "invalid_demo") from e
    return members[name]


def _from_sqlite(data: bytes) -> list[Pending]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "import.sqlite"
        path.write_bytes(data)
        try:
            db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
            try:
                if db.execute(_HAS_POOL).fetchone() is None:
                    raise bad_request(
                        "not an icd pool: the SQLite file has no annotations table", "bad_archive"
                    )
                return [_sqlite_row(row) for row in db.execute(_POOL_ROWS)]
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            raise bad_request(f"not a readable icd pool: {e}", "bad_archive") from e


def _sqlite_row(row: tuple[Any, ...]) -> Pending:
    demo_id, query_id, image_png, prompt, options, answer, teacher, votes, agreement = row
    where = f"pool demo {demo_id}"
    if image_png is not None and not isinstance(image_png, bytes):
        raise unprocessable(f"{where}: image_png is not a blob", "invalid_demo")
    fields = {
        "prompt": prompt,
        "label": answer,
        "options": parse_json(options, f"{where}: options") if options else None,
        "query_id": query_id,
        "teacher": teacher,
        "votes": parse_json(votes, f"{where}: votes") if votes else None,
        "agreement": agreement,
    }
    return fields, image_png, where
