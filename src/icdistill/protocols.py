"""The seams of the system: every backend, selector, gate and pool implements one of these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from icdistill.types import Demo, Embeddings, GateContext, GateDecision, Prediction, Query, TeacherResponse


@runtime_checkable
class Student(Protocol):
    """Answers a query given in-context demonstrations.

    With ``query.options`` set it scores every option (``Prediction.option_scores``); otherwise it
    generates an answer and reports per-token entropies.
    """

    name: str

    def predict(self, query: Query, demos: Sequence[Demo]) -> Prediction: ...


@runtime_checkable
class Teacher(Protocol):
    """Returns ``n`` independently sampled answers to a query (zero-shot, no demonstrations).

    Raises ``TeacherError`` when it cannot answer.
    """

    name: str

    def sample(self, query: Query, n: int) -> TeacherResponse: ...


@runtime_checkable
class Embedder(Protocol):
    """Puts queries and answers into the retrieval spaces named in ``icdistill.types``."""

    def embed_query(self, query: Query) -> Embeddings: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class Pool(Protocol):
    """The growing set of demonstrations, with a vector index per embedding space."""

    def __len__(self) -> int: ...

    def demos(self) -> list[Demo]: ...

    def vectors(self, key: str) -> tuple[list[int], np.ndarray]:
        """Ids and an (n, d) matrix of L2-normalised vectors of the demos that have ``key``."""
        ...

    def get(self, demo_id: int) -> Demo: ...


@runtime_checkable
class Selector(Protocol):
    """Chooses up to ``k`` demonstrations from the pool for a query, best first."""

    def select(self, query: Query, embeddings: Embeddings, pool: Pool, k: int) -> list[Demo]: ...


@runtime_checkable
class Gate(Protocol):
    """Decides whether the teacher is asked for a query, from the student's uncertainty.

    ``decide`` must not change state; ``observe`` is called once per query afterwards with what
    happened, so a gate can be replayed from a log on resume.
    """

    def decide(self, uncertainty: float, ctx: GateContext) -> GateDecision: ...

    def observe(self, uncertainty: float, ctx: GateContext, asked: bool) -> None: ...
