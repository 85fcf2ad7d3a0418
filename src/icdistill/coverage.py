"""What a gate needs to see where the pool is blind: how typical a query is of the stream so far.

``StreamDensity`` keeps a compact sketch of the last queries' image vectors (a fixed random
projection, which keeps cosines within about 0.1 at 128 dimensions) and scores a new query by the
mean cosine to its nearest neighbours among them. The sketch of each query is small enough to go
into the run log, so a resumed run rebuilds the same history without re-embedding anything.
"""

from __future__ import annotations

import base64
from collections import deque

import numpy as np

from icdistill.errors import ICDError


class StreamDensity:
    """Typicality of a query among the last ``window`` queries: the mean cosine of its
    ``neighbours`` nearest (None until that many were seen)."""

    def __init__(self, window: int = 500, neighbours: int = 10, dim: int = 128, seed: int = 0) -> None:
        if window < 1 or neighbours < 1 or dim < 1 or neighbours > window:
            raise ICDError("stream density: window, neighbours and dim must be >= 1, neighbours <= window")
        self.window = window
        self.neighbours = neighbours
        self.dim = dim
        self.seed = seed
        self._projections: dict[int, np.ndarray] = {}
        self._history: deque[np.ndarray] = deque(maxlen=window)

    def sketch(self, vec: np.ndarray) -> np.ndarray:
        """The unit-norm ``dim``-d random projection of a vector (float16: what the log stores)."""
        v = np.asarray(vec, dtype=np.float32).ravel()
        proj = self._projections.get(v.size)
        if proj is None:
            rng = np.random.default_rng([self.seed, v.size])
            proj = (rng.standard_normal((v.size, self.dim)) / np.sqrt(self.dim)).astype(np.float32)
            self._projections[v.size] = proj
        s = v @ proj
        n = float(np.linalg.norm(s))
        return (s / n if n > 0 else s).astype(np.float16)

    def typicality(self, sketch: np.ndarray) -> float | None:
        if len(self._history) < self.neighbours:
            return None
        mat = np.stack(self._history).astype(np.float32)
        sims = mat @ sketch.astype(np.float32)
        top = np.partition(sims, len(sims) - self.neighbours)[-self.neighbours :]
        return float(top.mean())

    def add(self, sketch: np.ndarray) -> None:
        self._history.append(np.asarray(sketch, dtype=np.float16))


def encode_sketch(sketch: np.ndarray) -> str:
    return base64.b64encode(np.asarray(sketch, dtype="<f2").tobytes()).decode("ascii")


def decode_sketch(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f2").astype(np.float16)
