"""Plain data that flows through the online loop: queries, demonstrations, predictions, annotations."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from icdistill.errors import DataError

# Keys of the embedding spaces a Demo or a query can carry. A selector stage is skipped when a
# key is missing on either side.
IMAGE = "image"  # image-image space (e.g. EfficientNet pooled features)
IMAGE_TEXT = "image_text"  # image placed in the text space (e.g. ConSE over MiniLM)
TEXT = "text"  # the prompt's text embedding
ANSWER = "answer"  # the demo answer's text embedding (same space as IMAGE_TEXT and TEXT)

Embeddings = dict[str, np.ndarray]


def image_digest(image: Image.Image) -> str:
    """Content hash of a decoded image: used to cache per-image work and to dedup the pool."""
    h = hashlib.sha1()
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def image_to_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_to_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# the longest side over the shortest that an image may have: a 1 x 20,000 PNG of 118 bytes is no photo
MAX_ASPECT_RATIO = 50


def check_image_shape(width: int, height: int, max_aspect: float = MAX_ASPECT_RATIO) -> None:
    """Raise ``DataError`` for an empty or extremely elongated image (read from the header, before any
    pixel is decoded): the service answers it with a 4xx, ``icd run`` skips it as ``bad_input``."""
    if width < 1 or height < 1:
        raise DataError(f"the image is {width}x{height} pixels: empty")
    if max(width, height) > max_aspect * min(width, height):
        raise DataError(
            f"the image is {width}x{height} pixels: its sides differ by more than {max_aspect:g}x (the limit)"
        )


def too_many_pixels(error: Exception, limit: int | None = None, flag: str | None = None) -> str:
    """Pillow's decompression-bomb refusal said plainly: the image's pixels, the limit, and what sets
    it (``flag``, else Pillow's own guard, ``PIL.Image.MAX_IMAGE_PIXELS``)."""
    import re

    m = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(m.group(1)):,} pixels" if m else "more pixels than the limit"
    guard = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    if limit is not None:
        shown = min(limit, guard) if guard else limit
        by = f" ({flag})" if flag and shown == limit else " (Pillow's decompression-bomb guard)"
    else:
        shown, by = guard, " (Pillow's decompression-bomb guard): downscale it"
    return f"the image has {size}; the limit is {shown:,}{by}" if shown else f"the image has {size}"


@dataclass(frozen=True)
class Query:
    """One item of the stream: an image and a prompt, optionally with candidate answers and a label.

    ``label`` is the ground truth used for evaluation and by the ``reference`` teacher; the student
    never sees it. ``options`` is set for classification (answers are scored), ``None`` for open
    answers (answers are generated).
    """

    id: str
    image: Image.Image | None
    prompt: str
    options: tuple[str, ...] | None = None
    label: str | None = None
    position: int = 0
    image_ref: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class Demo:
    """A pooled in-context demonstration: a past query and the teacher's (voted) answer."""

    id: int
    query_id: str
    image: Image.Image | None
    prompt: str
    answer: str
    # a pool's demos read their vectors from its index (icdistill.pool.IndexedEmbeddings)
    embeddings: Mapping[str, np.ndarray] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prediction:
    """What a student answered, with the raw signals the uncertainty measures need.

    ``option_scores`` are length-normalised log-likelihoods per candidate (classification);
    ``token_logprobs``/``token_entropies`` are per generated token (open answers).
    """

    answer: str
    option_scores: dict[str, float] | None = None
    token_logprobs: list[float] | None = None
    token_entropies: list[float] | None = None
    seconds: float = 0.0
    # what a student wants logged about how it answered (e.g. its experts' answers and weights)
    details: dict[str, Any] = field(default_factory=dict)

    def option_probs(self) -> dict[str, float]:
        if not self.option_scores:
            return {}
        keys = list(self.option_scores)
        s = np.array([self.option_scores[k] for k in keys], dtype=np.float64)
        p = np.exp(s - s.max())
        p /= p.sum()
        return dict(zip(keys, p.tolist(), strict=True))


@dataclass
class Usage:
    """Cost accounting of teacher calls."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    faults: int = 0  # retried or failed requests (timeouts, 5xx, 429, malformed replies)
    cached: int = 0  # answers served from a response cache (no request, no cost)

    def add(self, other: Usage) -> None:
        self.cached += other.cached
        self.calls += other.calls
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd
        self.faults += other.faults


@dataclass
class TeacherResponse:
    """Raw samples from one teacher request (N answers) and what they cost."""

    answers: list[str]
    usage: Usage = field(default_factory=Usage)


@dataclass
class Annotation:
    """The teacher's answer after test-time scaling (vote over N samples)."""

    answer: str
    samples: list[str]
    votes: dict[str, int]
    agreement: float
    accepted: bool
    teacher: str
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0


@dataclass(frozen=True)
class GateContext:
    """What a gate may know besides the uncertainty: where we are in the stream and what was spent."""

    position: int  # 0-based index of the query in the stream
    teacher_calls: int  # teacher requests made so far (accepted or rejected)
    pool_size: int
    # the uncertainty's scale, e.g. "options" (normalised option entropy) or "open" (token entropy):
    # a gate keeps separate statistics per kind
    kind: str = ""
    # what a coverage-aware gate sees besides the uncertainty, e.g. ``nearest_demo_similarity`` (of
    # the nearest pooled demo of the same kind; absent: none) and ``typicality`` (of the query among
    # the stream's recent queries)
    signals: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GateDecision:
    ask: bool
    reason: str  # e.g. "uncertainty 0.71 > threshold 0.55", "warm-up", "cap reached"
    threshold: float | None = None
    score: float | None = None  # what the gate ranked the query by, when it ranks
