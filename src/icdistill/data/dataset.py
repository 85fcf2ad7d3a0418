"""What every dataset loader builds on: ``Dataset`` (a finite, indexable collection of image queries,
decoded lazily and cached), ``FileDataset`` over image files (``Record``), and reading images.

The loaders (``fashion_mnist``, ``folder``, ``manifest``, ``hf``) import from here; ``stream`` imports
them to resolve a source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from icdistill.errors import DataError
from icdistill.pool.image_cache import ImageCache
from icdistill.types import Query, check_image_shape, too_many_pixels

DEFAULT_PROMPT = "What is shown in this image?"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
FASHION_MNIST_NAMES = frozenset({"fashion-mnist", "fashion_mnist", "fashionmnist"})

# Decoded images are kept per dataset so a query seen again (demo pool, re-scoring, resume) is not
# decoded twice; both bounds apply, the byte bound guards against folders of large photos.
CACHE_ITEMS = 20_000
CACHE_BYTES = 512 * 1024 * 1024


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 item"``, ``"2 items"``: a count with its noun in the right number."""
    return f"{n} {word if n == 1 else many or word + 's'}"


class Dataset:
    """A finite, indexable collection of image queries; subclasses supply metadata and decoding.

    Images are decoded lazily on ``item(i)`` and cached; the returned image is a copy, so callers
    may modify it without corrupting the cache.
    """

    name: str
    options: tuple[str, ...] | None

    def __init__(
        self,
        name: str,
        options: tuple[str, ...] | None,
        *,
        cache_items: int = CACHE_ITEMS,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.name = name
        self.options = options
        # what loading noticed but did not refuse (unknown manifest keys, files that are no images):
        # ``icd run`` prints these before the stream starts
        self.warnings: list[str] = []
        self._cache = ImageCache(cache_items, cache_bytes)

    def __len__(self) -> int:
        raise NotImplementedError

    def __repr__(self) -> str:
        n_opts = "open" if self.options is None else f"{len(self.options)} options"
        return f"{type(self).__name__}({self.name!r}, {len(self)} items, {n_opts})"

    def _query(self, i: int) -> Query:
        """The query for item ``i`` without its image (``image=None``)."""
        raise NotImplementedError

    def _decode(self, i: int) -> Image.Image:
        """Decode item ``i``'s image as RGB or L; raise DataError naming the source if unreadable."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A digest of what the stream is made of (ids, prompts, options, labels, file sizes), without
        decoding images: a resumed run refuses a dataset that changed under it."""
        h = hashlib.sha1(f"{len(self)}".encode())
        for i in range(len(self)):
            q = self._query(i)
            h.update(
                json.dumps([q.id, q.prompt, q.label, list(q.options or ()), self._content_key(i)]).encode()
            )
        return h.hexdigest()[:20]

    def _content_key(self, i: int) -> str:
        """A cheap stand-in for item ``i``'s image content (e.g. its file size); "" when fixed."""
        return ""

    def labels(self) -> list[str]:
        """Per-item ground-truth labels aligned with indices ("" for an unlabelled item); no decoding."""
        return [self._query(i).label or "" for i in range(len(self))]

    def where(self, i: int) -> str:
        """Where item ``i`` comes from, for messages (a manifest's file:line; else its id)."""
        return self._query(i).id

    def image(self, i: int) -> Image.Image:
        self._check_index(i)
        cached = self._cache.get(i)
        if cached is None:
            cached = self._decode(i)
            self._cache.put(i, cached)
        return cached.copy()

    def item(self, i: int) -> Query:
        self._check_index(i)
        return dataclasses.replace(self._query(i), image=self.image(i))

    def _check_index(self, i: int) -> None:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range 0..{len(self) - 1}")


@dataclass(frozen=True)
class Record:
    """One file-backed item: where its image is and what is asked about it."""

    id: str
    path: Path
    prompt: str
    label: str | None = None
    options: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    where: str = field(default="", compare=False)  # e.g. a manifest's file:line; "" for the id


class FileDataset(Dataset):
    """Items whose images are files on disk (class folders, manifests)."""

    def __init__(self, name: str, records: Sequence[Record], options: tuple[str, ...] | None, **cache: int):
        super().__init__(name, options, **cache)
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def _query(self, i: int) -> Query:
        r = self.records[i]
        return Query(
            id=r.id,
            image=None,
            prompt=r.prompt,
            options=r.options,
            label=r.label,
            image_ref=str(r.path),
            meta={"dataset": self.name, "index": i, **r.meta},
        )

    def _decode(self, i: int) -> Image.Image:
        return open_image(self.records[i].path)

    def _content_key(self, i: int) -> str:
        try:
            return str(self.records[i].path.stat().st_size)
        except OSError:
            return "missing"

    def labels(self) -> list[str]:
        return [r.label or "" for r in self.records]

    def where(self, i: int) -> str:
        return self.records[i].where or self.records[i].id


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file to RGB or L (EXIF rotation applied, alpha flattened onto white)."""
    try:
        with Image.open(path) as im:
            check_image_shape(*im.size)  # from the header: a 1 x 20,000,000 strip is never decoded
            # exif_transpose returns a loaded copy, so the result outlives the closed file.
            return normalise_mode(ImageOps.exif_transpose(im))
    except DataError as e:
        raise DataError(f"cannot use image {path}: {e}") from e
    except Image.DecompressionBombError as e:
        raise DataError(f"cannot use image {path}: {too_many_pixels(e)}") from e
    # Broad on purpose: decoders raise assorted types (OSError, SyntaxError, struct.error...) on bad files.
    except Exception as e:
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def normalise_mode(image: Image.Image) -> Image.Image:
    """Bring any Pillow mode to RGB (colour) or L (grayscale), the two modes models accept."""
    mode = image.mode
    if mode in ("RGB", "L"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode.startswith("I;16"):
        arr = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if mode in ("I", "F"):
        # No fixed range for 32-bit data: stretch what is there.
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8))
    has_alpha = "A" in mode or "a" in mode or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        grey = mode in ("LA", "La") or (mode == "PA" and _palette_is_grey(image))
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(white, rgba).convert("RGB")
        return flat.convert("L") if grey else flat
    return image.convert("RGB")


def _palette_is_grey(image: Image.Image) -> bool:
    palette = image.getpalette() or []
    return all(palette[k] == palette[k + 1] == palette[k + 2] for k in range(0, len(palette) - 2, 3))
