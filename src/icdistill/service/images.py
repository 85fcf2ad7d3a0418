"""Decoding images sent by clients: bytes or base64 only (no URL is ever fetched), with limits on the
pixels of one image, their shape (the preprocessing's aspect-ratio bound) and, for an import, their
total."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, UnidentifiedImageError

from icdistill.errors import DataError, ServiceError
from icdistill.service.errors import bad_request
from icdistill.types import check_image_shape, too_many_pixels

_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


class PixelBudget:
    """The pixels an import may decode in all (one image named by 40 lines counts 40 times)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.spent = 0

    def spend(self, pixels: int) -> None:
        self.spent += pixels
        if self.spent > self.limit:
            raise ServiceError(
                413,
                "import_too_large",
                f"the import's images hold more than {self.limit} pixels in all (--max-import-pixels)",
            )


def check_header(w: int, h: int, max_pixels: int, budget: PixelBudget | None) -> None:
    if w * h > max_pixels:
        raise ServiceError(
            413, "image_too_large", f"image has {w}x{h} = {w * h} pixels; the limit is {max_pixels}"
        )
    try:
        check_image_shape(w, h)
    except DataError as e:
        raise bad_request(str(e), "bad_image") from e
    if budget is not None:
        budget.spend(w * h)


@contextmanager
def _image_errors(max_pixels: int | None = None) -> Iterator[None]:
    """Pillow's many failures as the service's 4xx."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ServiceError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ServiceError(413, "image_too_large", too_many_pixels(e, max_pixels, "--max-pixels")) from e
    except UnidentifiedImageError:
        raise bad_request("the image is corrupt or not in a known image format", "bad_image") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise bad_request(f"the image cannot be decoded (corrupt or not an image): {e}", "bad_image") from e


def open_image(data: bytes, max_pixels: int, budget: PixelBudget | None = None) -> Image.Image:
    """The image with only its header read, its size and shape checked (and spent from ``budget``)."""
    if not data:
        raise bad_request("the image is empty", "bad_image")
    with _image_errors(max_pixels):
        img = Image.open(io.BytesIO(data))
        check_header(*img.size, max_pixels, budget)
    return img


def decode_image(data: bytes, max_pixels: int, budget: PixelBudget | None = None) -> Image.Image:
    """A fully decoded image; its size and shape are checked from the header before any pixel is decoded."""
    img = open_image(data, max_pixels, budget)
    with _image_errors(max_pixels):
        img.load()
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return img


def decode_b64_image(text: str, max_pixels: int) -> Image.Image:
    text = text.strip()
    if _URL.match(text):
        raise bad_request(
            "image_b64 looks like a URL; the service never fetches URLs: send the image bytes base64-encoded",
            "bad_base64",
        )
    text = _DATA_URI.sub("", text, count=1)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"image_b64 is not valid base64: {e}", "bad_base64") from e
    return decode_image(data, max_pixels)


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
