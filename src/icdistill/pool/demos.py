"""Demonstrations as every pool backend stores them: built from an annotation (``pooled_demo``) or a
database row (``stored_demo``), their images behind a bounded cache and their vectors read from the
pool's index, with the columns and vector rows the backends read them from."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
from PIL import Image

from icdistill.errors import ICDError
from icdistill.pool.image_cache import ImageCache
from icdistill.pool.index import VectorIndex, spare_rows
from icdistill.types import (
    Annotation,
    Demo,
    Embeddings,
    Query,
    png_to_image,
)

AddStatus = Literal["added", "rejected", "duplicate", "exists"]


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


class IndexedEmbeddings(Mapping[str, np.ndarray]):
    """A pooled demo's vectors, read from the pool's index when asked for: every vector lives once, in
    the index (a per-demo copy beside it doubled the memory of a 1M-demo pool)."""

    __slots__ = ("_by_key", "_id")

    def __init__(self, by_key: dict[str, VectorIndex], demo_id: int) -> None:
        self._by_key = by_key
        self._id = demo_id

    def __getitem__(self, key: str) -> np.ndarray:
        index = self._by_key.get(key)
        if index is None or self._id not in index:
            raise KeyError(key)
        return index.vector(self._id)

    def __iter__(self) -> Iterator[str]:
        return iter([k for k, index in self._by_key.items() if self._id in index])

    def __len__(self) -> int:
        return sum(1 for index in self._by_key.values() if self._id in index)

    def __repr__(self) -> str:
        return f"IndexedEmbeddings(demo {self._id}: {list(self)})"


# Pooled demos' images are decoded on use and kept in a bounded LRU: decoding every demo's image at
# open would hold a pool of a million photos in memory.
DEMO_IMAGE_CACHE_ITEMS = 4096
DEMO_IMAGE_CACHE_BYTES = 256 * 1024 * 1024


class DemoImages:
    """The images of a pool's demos: stored in its database, decoded when a demo's ``image`` is read,
    kept in a bounded LRU. ``fetch`` returns a demo's encoded image (None when it has none); it may be
    called from any thread."""

    def __init__(
        self,
        fetch: Callable[[int], bytes | None],
        where: str,
        max_items: int = DEMO_IMAGE_CACHE_ITEMS,
        max_bytes: int = DEMO_IMAGE_CACHE_BYTES,
    ) -> None:
        self._fetch = fetch
        self._where = where
        self._lock = threading.Lock()
        self.cache = ImageCache(max_items, max_bytes)
        self.decoded = 0  # images read back from the database (cache misses)

    def put(self, demo_id: int, image: Image.Image) -> None:
        self.cache.put(demo_id, image)

    def get(self, demo_id: int) -> Image.Image | None:
        image = self.cache.get(demo_id)
        if image is not None:
            return image
        with self._lock:
            try:
                data = self._fetch(demo_id)
            except Exception as e:  # a closed pool, a lost connection: say which demo and where
                raise ICDError(f"cannot read the image of demo {demo_id} from {self._where}: {e}") from e
        if data is None:
            return None
        try:
            image = png_to_image(data)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for a corrupt file
            raise ICDError(f"the image of demo {demo_id} in {self._where} is corrupt: {e}") from e
        self.decoded += 1
        self.cache.put(demo_id, image)
        return image


class StoredDemo(Demo):
    """A pooled demo whose image stays in the pool's database until it is read (``DemoImages``).

    It behaves as a ``Demo``; a copy or a pickle of it is a plain ``Demo`` holding the decoded image."""

    def __init__(self, images: DemoImages, has_image: bool, **fields: Any) -> None:
        self._images = images
        self._has_image = has_image
        super().__init__(image=None, **fields)

    @property  # type: ignore[override]
    def image(self) -> Image.Image | None:
        return self._images.get(self.id) if self._has_image else None

    @image.setter
    def image(self, value: Image.Image | None) -> None:
        if value is not None:
            raise AttributeError("a pooled demo's image is read from its pool")

    def __repr__(self) -> str:
        # not the dataclass repr: it read the image from the pool (and raised once it was closed)
        image = "<in the pool>" if self._has_image else None
        return (
            f"StoredDemo(id={self.id!r}, query_id={self.query_id!r}, image={image}, prompt={self.prompt!r}, "
            f"answer={self.answer!r}, embeddings={self.embeddings!r}, provenance={self.provenance!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        fields = (self.id, self.query_id, self.image, self.prompt, self.answer)
        return (Demo, (*fields, dict(self.embeddings), dict(self.provenance)))


def read_vectors(rows: Iterable[tuple[int, bytes]], count: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``count`` stored (id, float32 bytes) rows, streamed into one matrix with spare rows that the
    index adopts (see ``spare_rows``); None when there are no rows. Rows past ``count`` (added after
    it was taken) are left to the next open's catch-up."""
    ids = np.empty(count, dtype=np.int64)
    mat: np.ndarray | None = None
    n = 0
    for demo_id, blob in rows:
        if n == count:
            break
        row = np.frombuffer(blob, dtype=np.float32)
        if mat is None:
            mat = np.empty((count + spare_rows(count), row.shape[0]), dtype=np.float32)
        ids[n], mat[n] = demo_id, row
        n += 1
    return ids[:n], mat


def pooled_demo(
    demo_id: int, query: Query, annotation: Annotation, embeddings: Embeddings, images: DemoImages
) -> Demo:
    """The demonstration a pooled annotation becomes, with its provenance (every pool backend); its
    image goes to the pool's image cache, not into the demo."""
    if query.image is not None:
        images.put(demo_id, query.image)
    return StoredDemo(
        images,
        query.image is not None,
        id=demo_id,
        query_id=query.id,
        prompt=query.prompt,
        answer=annotation.answer,
        embeddings={k: _unit(v) for k, v in embeddings.items()},
        provenance={
            "teacher": annotation.teacher,
            "votes": annotation.votes,
            "agreement": annotation.agreement,
            "position": query.position,
            "image_ref": query.image_ref,
            "options": list(query.options) if query.options else None,
        },
    )


SHARED_VALUES_MAX = 65536  # distinct values kept in a pool's ``shared`` before it starts afresh


def stored_demo(
    row: tuple[Any, ...], embeddings: Mapping[str, np.ndarray], images: DemoImages, shared: dict[Any, Any]
) -> Demo:
    """A pooled demo from its database row (``DEMO_COLUMNS``, every pool backend).

    Values many demos repeat (prompt, answer, teacher, option list, votes) are one object each, kept
    in ``shared``: parsed per demo they were a third of a 1M-demo pool's Python memory. A demo's
    provenance is read-only."""
    demo_id, query_id, position, has_image, image_ref, prompt, answer, teacher, votes, agreement, options = (
        row
    )
    if len(shared) >= SHARED_VALUES_MAX:
        # values of demos long evicted stay here otherwise: a worker that reads every other worker's
        # demos, each with its own prompt, grew it for as long as it ran
        shared.clear()
    return StoredDemo(
        images,
        bool(has_image),
        id=demo_id,
        query_id=query_id,
        prompt=_one(shared, prompt),
        answer=_one(shared, answer),
        embeddings=embeddings,
        provenance={
            "teacher": _one(shared, teacher),
            "votes": _parsed(shared, votes, {}),
            "agreement": agreement,
            "position": position,
            "image_ref": image_ref,
            "options": _parsed(shared, options, None),
        },
    )


def _one(shared: dict[Any, Any], value: Any) -> Any:
    return shared.setdefault(value, value) if isinstance(value, str) else value


def _parsed(shared: dict[Any, Any], raw: str | None, empty: Any) -> Any:
    if not raw:
        return empty
    key = ("json", raw)
    value = shared.get(key)
    if value is None:
        value = shared[key] = json.loads(raw)
    return value


# the columns of a pooled demo's row, without its image (read on use)
DEMO_COLUMNS = "id, query_id, position, image_png IS NOT NULL, image_ref, prompt, answer, teacher, votes, agreement, options"
