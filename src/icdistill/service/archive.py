"""Reading an import (a ``/v1/export`` zip or an ``icd run`` pool.sqlite) into checked demo records.

Everything is read and checked before anything is pooled, so an import is all-or-nothing: every line
or row goes through ``validate.demo_record`` (as ``POST /v1/demos`` does) as it is read (the first bad
one ends the import; at most ``max_lines`` of them), every image through
``decode_image`` with the per-image pixel limit, and all images together through one pixel budget.
Runs off the loop thread: reading never holds up the student.
"""

from __future__ import annotations

import io
import sqlite3
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

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
    max_lines: int = 100_000


MAX_LINE_BYTES = 4 * 1024 * 1024  # a line of 1000 options of 500 characters, escaped, fits

# one demo as read, checked but for its image: its record and its image's bytes
Pending = tuple[DemoRecord, bytes | None]


def read_import(data: bytes, limits: ImportLimits) -> list[DemoRecord]:
    """The demos of an import, all checked; raises a 4xx naming the first bad line or row. Each line
    is checked as it is read, so a bad one ends the import there, whatever follows it."""
    if data[:16] == SQLITE_MAGIC:
        return _checked(_from_sqlite(data, limits), limits)
    if data[:4] == ZIP_MAGIC:
        return _checked(_from_zip(data, limits), limits)
    raise ServiceError(
        415, "bad_archive", "import takes a zip archive from /v1/export or an icd run pool.sqlite"
    )


def _record(fields: dict[str, Any], where: str) -> DemoRecord:
    return demo_record(fields, None, f"import-{uuid.uuid4().hex}", "import", where)


def _too_many(limits: ImportLimits, what: str) -> ServiceError:
    return ServiceError(
        413, "archive_too_large", f"the import has more than {limits.max_lines} {what} (--max-import-lines)"
    )


def _checked(items: list[Pending], limits: ImportLimits) -> list[DemoRecord]:
    """Every image's header (its size, shape and the import's pixel budget), then the pixels: an
    import refused for its size decodes nothing."""
    budget = PixelBudget(limits.max_import_pixels)
    for rec, image in items:
        if image:
            _at(rec.where, open_image, image, limits.max_pixels, budget)
    decoded: dict[int, Any] = {}  # one archive file named by many lines: decoded once, by identity
    out = []
    for rec, image in items:
        if image and id(image) not in decoded:
            decoded[id(image)] = _at(rec.where, decode_image, image, limits.max_pixels)
        out.append(replace(rec, image=decoded[id(image)]) if image else rec)
    return out


def _at(where: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, its 4xx naming the line or row."""
    try:
        return fn(*args)
    except ServiceError as e:
        raise ServiceError(e.status, e.code, f"{where}: {e.message}", e.headers) from e


def _lines(stream: IO[bytes]) -> Iterator[bytes]:
    """The lines of ``stream``, each at most ``MAX_LINE_BYTES``: never the whole file at once."""
    n = 0
    while True:
        line = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        n += 1
        if len(line) > MAX_LINE_BYTES:
            raise unprocessable(f"demos.jsonl line {n}: longer than {MAX_LINE_BYTES} bytes", "invalid_demo")
        yield line


def _from_zip(data: bytes, limits: ImportLimits) -> list[Pending]:
    out: list[Pending] = []
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        if sum(i.file_size for i in z.infolist()) > limits.max_unpacked_bytes:
            raise ServiceError(413, "archive_too_large", "the archive unpacks to more than the import limit")
        members: dict[str, bytes] = {}  # a file named by many lines is unpacked once
        with z.open("demos.jsonl") as stream:
            for n, raw in enumerate(_lines(stream), 1):
                if n > limits.max_lines:
                    raise _too_many(limits, "lines in demos.jsonl")
                where = f"demos.jsonl line {n}"
                try:
                    line = raw.decode()
                except UnicodeDecodeError as e:
                    raise unprocessable(f"{where}: not UTF-8 ({e})", "invalid_demo") from e
                if not line.strip():
                    continue
                fields = parse_json(line, where)
                if not isinstance(fields, dict):
                    raise unprocessable(f"{where}: not a JSON object", "invalid_demo")
                out.append((_record(fields, where), _zip_member(z, fields.get("image"), members, where)))
    except (zipfile.BadZipFile, KeyError, EOFError) as e:
        raise bad_request(f"not a pool archive (zip with demos.jsonl): {e}", "bad_archive") from e
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


def _from_sqlite(data: bytes, limits: ImportLimits) -> list[Pending]:
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
                out = []
                for n, row in enumerate(db.execute(_POOL_ROWS), 1):
                    if n > limits.max_lines:
                        raise _too_many(limits, "pooled demos")
                    out.append(_sqlite_row(row))
                return out
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
    return _record(fields, where), image_png
