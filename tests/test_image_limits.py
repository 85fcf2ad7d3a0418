"""An image too large to decode: the message says its pixels, the limit and what sets it, not
Pillow's "decompression bomb DOS attack" text (a PNG header claiming 20000x20000, nothing decoded)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from icdistill.data.dataset import open_image
from icdistill.errors import DataError, ServiceError
from icdistill.service import images


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data: only the header is read)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_a_huge_image_in_a_dataset_names_its_pixels_and_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(20000, 20000))
    with pytest.raises(DataError) as e:
        open_image(path)
    text = str(e.value)
    assert f"cannot use image {path}: the image has 400,000,000 pixels; the limit is" in text
    assert "decompression-bomb guard" in text and "DOS attack" not in text


def test_a_huge_image_sent_to_the_service_names_the_flag_that_sets_the_limit() -> None:
    with pytest.raises(ServiceError) as e:
        images.decode_image(_png_header(20000, 20000), max_pixels=24_000_000)
    assert e.value.status == 413
    assert e.value.message == "the image has 400,000,000 pixels; the limit is 24,000,000 (--max-pixels)"
