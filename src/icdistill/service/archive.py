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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icdistill.service.errors import ServiceError, bad_request, unprocessable
from icdistill.service.images import PixelBudget, decode_image
from icdistill.service.validate import DemoRecord, demo_record, parse_json

SQLITE_MAGIC = b"SQLite format 3\x00"
ZIP_MAGIC = b"PK\x03\x04"
# the columns of an icd run pool's pooled demos
_POOL_ROWS = (
    "SELECT id, query_id, image_png, prompt, options, answer, teacher, votes, agreement "
    "FROM annotations WHERE in_pool = 1 ORDER BY id"
)


@dataclass(frozen=True)
class ImportLimits:
    max_pixels: int
    max_import_pixels: int
    max_unpacked_bytes: int


def read_import(data: bytes, limits: ImportLimits) -> list[DemoRecord]:
    """The demos of an import, all checked; raises a 4xx naming the first bad line or row."""
    budget = PixelBudget(limits.max_import_pixels)
    if data[:16] == SQLITE_MAGIC:
        return _from_sqlite(data, limits, budget)
    if data[:4] == ZIP_MAGIC:
        return _from_zip(data, limits, budget)
    raise ServiceError(
        415, "bad_archive", "import takes a zip archive from /v1/export or an icd run pool.sqlite"
    )


def _record(fields: dict[str, Any], image: Any, where: str) -> DemoRecord:
    return demo_record(fields, image, f"import-{uuid.uuid4().hex}", "import", where)


def _from_zip(data: bytes, limits: ImportLimits, budget: PixelBudget) -> list[DemoRecord]:
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        if sum(i.file_size for i in z.infolist()) > limits.max_unpacked_bytes:
            raise ServiceError(413, "archive_too_large", "the archive unpacks to more than the import limit")
        lines = z.read("demos.jsonl").decode().splitlines()
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, EOFError) as e:
        raise bad_request(f"not a pool archive (zip with demos.jsonl): {e}", "bad_archive") from e
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"demos.jsonl line {n}"
        rec = parse_json(line, where)
        if not isinstance(rec, dict):
            raise unprocessable(f"{where}: not a JSON object", "invalid_demo")
        out.append(_record(rec, _zip_image(z, rec.get("image"), limits, budget, where), where))
    return out


def _zip_image(z: zipfile.ZipFile, name: Any, limits: ImportLimits, budget: PixelBudget, where: str) -> Any:
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise unprocessable(f"{where}: image must be a file name in the archive", "invalid_demo")
    try:
        data = z.read(name)
    except (KeyError, zipfile.BadZipFile, EOFError) as e:
        raise unprocessable(f"{where}: cannot read image {name!r}: {e}", "invalid_demo") from e
    return _decoded(data, limits, budget, where)


def _decoded(data: bytes, limits: ImportLimits, budget: PixelBudget, where: str) -> Any:
    try:
        return decode_image(data, limits.max_pixels, budget)
    except ServiceError as e:
        raise ServiceError(e.status, e.code, f"{where}: {e.message}") from e


def _from_sqlite(data: bytes, limits: ImportLimits, budget: PixelBudget) -> list[DemoRecord]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "import.sqlite"
        path.write_bytes(data)
        try:
            db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
            try:
                if (
                    db.execute(
                        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'annotations'"
                    ).fetchone()
                    is None
                ):
                    raise bad_request(
                        "not an icd pool: the SQLite file has no annotations table", "bad_archive"
                    )
                return [_sqlite_record(row, limits, budget) for row in db.execute(_POOL_ROWS)]
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            raise bad_request(f"not a readable icd pool: {e}", "bad_archive") from e


def _sqlite_record(row: tuple[Any, ...], limits: ImportLimits, budget: PixelBudget) -> DemoRecord:
    demo_id, query_id, image_png, prompt, options, answer, teacher, votes, agreement = row
    where = f"pool demo {demo_id}"
    fields = {
        "prompt": prompt,
        "label": answer,
        "options": parse_json(options, f"{where}: options") if options else None,
        "query_id": query_id,
        "teacher": teacher,
        "votes": parse_json(votes, f"{where}: votes") if votes else None,
        "agreement": agreement,
    }
    if image_png is not None and not isinstance(image_png, bytes):
        raise unprocessable(f"{where}: image_png is not a blob", "invalid_demo")
    image = _decoded(image_png, limits, budget, where) if image_png else None
    return _record(fields, image, where)
