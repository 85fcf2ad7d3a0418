"""The ``reference`` teacher: the dataset's own labels, optionally noisy, standing in for an oracle or a person."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from icdistill.errors import ICDError, SpecError, TeacherError
from icdistill.models.registry import ModelContext, Spec
from icdistill.types import Query, TeacherResponse, Usage


def unlabelled_refusal(teacher: str, labels: list[str]) -> str | None:
    """Why a run cannot start, checked before any model loads: ``--teacher reference`` answers with the
    labels, and the dataset has none; None when it can."""
    if teacher.split("?")[0].split(":")[0].strip().lower() != "reference" or any(labels):
        return None
    return (
        f"--teacher {teacher} answers with the dataset's labels, and none of its {len(labels)} items has "
        "one: it would have nothing to teach. Use a model as teacher (e.g. --teacher "
        "openai:gpt-4o-mini) or a labelled dataset"
    )


class ReferenceTeacher:
    """Answers with ``query.label``; each sample is independently wrong with probability ``noise``.

    Wrong samples pick another option uniformly, seeded by (seed, query id, sample index), so runs are
    reproducible and N samples of one query are independent draws that a vote can denoise.
    """

    def __init__(self, noise: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ICDError(f"reference noise must be in [0, 1], got {noise}")
        self.noise = noise
        self.seed = seed
        self.name = f"reference:noise={noise:g}" if noise else "reference"
        self._requests: dict[str, int] = {}

    def sample(self, query: Query, n: int) -> TeacherResponse:
        if query.label is None:
            raise TeacherError(f"query {query.id} has no reference label")
        # repeated requests for one query draw fresh samples (like a sampling teacher would)
        request = self._requests.get(query.id, 0)
        self._requests[query.id] = request + 1
        qhash = int(hashlib.sha1(query.id.encode()).hexdigest()[:12], 16)
        rng = np.random.default_rng([self.seed, qhash, request])
        others = [o for o in (query.options or ()) if o != query.label]
        answers = []
        for _ in range(n):
            if others and rng.random() < self.noise:
                answers.append(others[int(rng.integers(len(others)))])
            else:
                answers.append(query.label)
        return TeacherResponse(answers=answers, usage=Usage(calls=1))


def from_spec(spec: Spec, role: str, ctx: ModelContext) -> Any:
    if spec.target:
        raise SpecError(f"spec {spec.raw!r}: use 'reference' or 'reference:noise=P'")
    unknown = set(spec.options) - {"noise", "seed"}
    if unknown:
        raise SpecError(f"spec {spec.raw!r}: unknown option(s) {', '.join(sorted(unknown))}")
    return ReferenceTeacher(noise=spec.opt("noise", 0.0, float), seed=spec.opt("seed", ctx.seed, int))
